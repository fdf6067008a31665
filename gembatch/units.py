"""Sizes as people read them, in one convention: binary units, named as such.

Why: the dry run printed "1.5 MB" (powers of 1000) where `db backup` printed "1.5 MiB"
(powers of 1024), for the same kind of number. gembatch counts in powers of 1024 and says
so (KiB, MiB, GiB): Gemini's limits are binary (the 2 GB input file is 2 GiB, the
emulator enforces 2 * 1024**3 bytes), so are `serve --max-upload-mb` and the service's
body limits, and so are `ls -lh` and `du -h`, which people compare the figures with.
"""

from __future__ import annotations

_UNITS = ("KiB", "MiB", "GiB", "TiB")


def format_size(n: int) -> str:
    """`n` bytes for a person: "512 bytes", "1.5 KiB", "2.0 GiB"."""
    if n < 1024:
        return f"{n} byte" if n == 1 else f"{n} bytes"
    size = float(n)
    for unit in _UNITS:
        size /= 1024
        if round(size, 1) < 1024 or unit == _UNITS[-1]:  # never "1024.0 KiB"
            break
    return f"{size:.1f} {unit}"
