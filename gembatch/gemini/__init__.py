"""Everything that talks to Gemini (or the emulator) goes through this package."""
