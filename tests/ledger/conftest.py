"""Fixtures for the ledger tests: commands run as a user that file permissions bind.

Why: an unreadable ledger or a read-only directory is only a refusal for a user that the
permission bits apply to; root reads and writes everything. Under root (as CI runs), the
`unprivileged` fixture runs such commands as `nobody` through setpriv, in a directory that
user can reach; otherwise as the current user in the test's own directory.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass
class Unprivileged:
    """Where and how to run a command that file permissions apply to."""

    directory: Path  # a directory of the test's that the user can reach (mode 0755)
    uid: int
    gid: int
    prefix: list[str] = field(default_factory=list)  # put before a command: runs it as uid

    def command(self, *args: str) -> list[str]:
        return [*self.prefix, *args]

    def env(self) -> dict[str, str]:
        # No bytecode written into the checkout by another user.
        return {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


@pytest.fixture
def unprivileged(tmp_path: Path) -> Iterator[Unprivileged]:
    if os.geteuid() != 0:
        yield Unprivileged(tmp_path, os.getuid(), os.getgid())
        return
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux) to drop to nobody")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("running as root with no user 'nobody' to drop to")
    uid, gid = nobody.pw_uid, nobody.pw_gid
    prefix = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    # tmp_path lies under /tmp/pytest-of-root (mode 0700): nobody cannot reach it.
    directory = Path(tempfile.mkdtemp(prefix="gembatch-unprivileged-"))
    directory.chmod(0o755)
    try:
        probe = subprocess.run(
            [*prefix, sys.executable, "-c", "import os, gembatch; print(os.geteuid())"],
            capture_output=True,
            text=True,
            cwd=directory,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
            timeout=60,
        )
        if probe.returncode != 0 or probe.stdout.strip() != str(uid):
            pytest.skip(
                f"cannot run this checkout's python as nobody (uid {uid}): "
                f"{probe.stderr.strip()[-300:] or probe.stdout.strip()}"
            )
        yield Unprivileged(directory, uid, gid, prefix)
    finally:
        shutil.rmtree(directory, ignore_errors=True)  # root: whatever the modes inside
