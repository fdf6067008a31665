"""Failpoints: stop the process at a named point of its work. A test facility.

Why: "a kill between the create's answer and its ledger write loses nothing" can only be
proven by killing the process at exactly that instant, which no timing from outside hits
reliably. With `GEMBATCH_FAILPOINT=<name>` the process SIGKILLs itself the first time it
reaches the point of that name; `<name>:stop` sends SIGSTOP instead, so that a test can act
while it is frozen (stop the emulator, say) and then SIGCONT it. The variable is read once,
at import; unset, a failpoint costs one comparison. Points: `create.before_call` (the intent is
recorded, batches.create not sent yet) and `create.after_answer` (the batch exists and its
name is known, not recorded yet).
"""

from __future__ import annotations

import os
import signal

_ARMED = os.environ.get("GEMBATCH_FAILPOINT") or None


def failpoint(name: str) -> None:
    """Kill (or stop) this process here if `GEMBATCH_FAILPOINT` names this point."""
    global _ARMED
    if _ARMED is None:
        return
    point, _, action = _ARMED.partition(":")
    if point == name:
        _ARMED = None  # once: a process let go on after a stop goes on for good
        os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)
