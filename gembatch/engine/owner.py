"""Who holds a claim on a task, and whether that process is still alive.

Why: `submit`, `poll`, `retry` and `cancel` may run at the same time on one ledger, and
any of them may be killed. A task being uploaded, created or downloaded records its
owner; another process takes over only when the owner is provably gone (same host, and
the pid is dead or now belongs to a different process), never merely because it is slow.
"""

from __future__ import annotations

import os
import secrets
import socket
from typing import Any


def _start_ticks(pid: int) -> int | None:
    """The process start time in clock ticks since boot (Linux), to spot a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 overall
    except (IndexError, ValueError):
        return None


def current_owner(role: str) -> dict[str, Any]:
    """This process as a claim owner; `token` distinguishes engines within one process."""
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "start": _start_ticks(pid),
        "role": role,
        "token": secrets.token_hex(6),
    }


def owner_alive(owner: Any) -> bool:
    """False only when the owner is provably gone; an owner on another host is alive."""
    if not isinstance(owner, dict):
        return False
    if owner.get("host") != socket.gethostname():
        return True
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    recorded = owner.get("start")
    if recorded is None:
        return True
    current = _start_ticks(pid)
    return current is None or current == recorded


def is_mine(owner: Any, me: dict[str, Any]) -> bool:
    return isinstance(owner, dict) and owner.get("token") == me.get("token")
