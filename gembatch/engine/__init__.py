"""The engine: job decisions (`reducers`, pure) and their execution (`engine`, I/O)."""
