"""Crash-safe file replacement: the one atomic-write helper of the project.

Why: the original tool removed the ledger and then renamed a temp file over it, with no
fsync, so a crash in between lost the ledger. Here every replacement is written to a temp
file in the same directory, flushed and fsynced, `os.replace`d over the target and the
directory fsynced: at every instant the target holds either the old or the new bytes.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

StrPath = str | os.PathLike[str]


def fsync_dir(path: StrPath) -> None:
    """Make a rename or unlink inside directory `path` durable."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # platforms that cannot open directories (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _temp_prefix(basename: str) -> str:
    return f".{basename}."


@contextlib.contextmanager
def atomic_writer(path: StrPath, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Yield a handle on a temp file that replaces `path` when the block ends normally.

    The temp file lives in the same directory (`.<basename>.<random>.tmp`) so the final
    `os.replace` is a rename within one filesystem. An existing target's permission bits
    are kept (mkstemp creates 0600). If the block raises, the temp file is removed and the
    target is untouched.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_writer needs a write mode, not {mode!r}")
    target = Path(path)
    directory = target.parent
    fd, temp_name = tempfile.mkstemp(prefix=_temp_prefix(target.name), suffix=".tmp", dir=directory)
    try:
        # Reopened by name so that `handle.name` is the temp path, not a descriptor number.
        os.close(fd)
        with open(temp_name, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        _copy_mode(target, temp_name)
        os.replace(temp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise
    fsync_dir(directory)


def _copy_mode(target: Path, temp_name: str) -> None:
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        # A new file gets the mode `open()` would give it, not mkstemp's 0600.
        mode = 0o666 & ~_current_umask()
    os.chmod(temp_name, mode)


def _current_umask() -> int:
    try:  # Linux exposes it without the set-and-restore race of os.umask()
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def atomic_write_bytes(path: StrPath, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably."""
    with atomic_writer(path, "wb") as handle:
        handle.write(data)


def remove_stale_temps(directory: StrPath, basename: str) -> list[Path]:
    """Remove `.<basename>.*.tmp` files left by writers that crashed mid-write.

    Only safe while holding the lock that serialises writers of `basename`; otherwise it
    could delete a live writer's temp file. Returns the paths removed.
    """
    # mkstemp's random part is 8 characters from [a-z0-9_]; matching it exactly keeps the
    # temps of `<basename>.lock` or `<basename>.bak` out of reach.
    pattern = re.compile(re.escape(_temp_prefix(basename)) + r"[a-z0-9_]{8}\.tmp")
    removed: list[Path] = []
    try:
        entries = os.scandir(directory)
    except OSError:
        return removed
    with entries:
        for entry in entries:
            if pattern.fullmatch(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed
