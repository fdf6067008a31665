"""The service's settings: where it keeps its state, who may use it, how fast it polls.

Why: one object the CLI fills from its options and the environment, and the app, the
worker and the tests read; defaults are safe (localhost, no tokens = one local user).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from gembatch.errors import UserError


@dataclass
class ServerSettings:
    db_url: str = "sqlite:///gembatch.db"
    data_dir: Path = Path("gembatch-data")
    host: str = "127.0.0.1"
    port: int = 8080
    tokens: dict[str, str] = field(default_factory=dict)  # bearer token -> user id
    tokens_file: Path | None = None  # where `tokens` came from (never an input_file)
    max_upload_bytes: int = 2 * 1024**3  # Gemini's input file limit
    poll_interval: float = 10.0
    max_live_batches: int = 10
    poll_concurrency: int = 32
    ping_interval: float = 30.0  # SSE `ping` after this long without an event
    notify_url: str | None = None  # service-wide webhook for finished jobs
    notify_attempts: int = 8  # deliveries of one notification before giving up
    notify_max_delay: float = 300.0  # longest wait between two deliveries (s)
    # Webhooks to loopback, private, link-local ... addresses (tests, intranets); off, a
    # notify_url could make the service reach its own network (webhook_targets).
    notify_allow_private: bool = False
    model: str = "gemini-2.5-flash-lite"
    api_key: str | None = None
    base_url: str | None = None
    event_poll_interval: float = 0.2  # how often the SSE hub reads new events (SQLite)
    # PostgreSQL: how often the SSE hub re-reads every subscribed job's log without a
    # notification (the safety net for a lost NOTIFY or a silent LISTEN connection).
    event_requery_interval: float = 5.0

    @property
    def single_user(self) -> bool:
        return not self.tokens

    @property
    def inputs_dir(self) -> Path:
        return self.data_dir / "inputs"

    def check(self) -> None:
        """Refuse unsafe combinations before anything starts."""
        if self.single_user and not is_loopback(self.host):
            shown = self.host or "'' (every interface)"
            raise UserError(
                f"refusing to serve on {shown} without API tokens: anyone who can reach "
                "it could run jobs on your Gemini key. Give --tokens FILE (or "
                "$GEMBATCH_TOKENS=token:user,...), or bind to 127.0.0.1"
            )
        if self.max_upload_bytes < 1:
            raise UserError("--max-upload-mb must be at least 1")
        if self.notify_attempts < 1:
            raise UserError("--notify-attempts must be at least 1")
        if self.notify_max_delay < 0:
            raise UserError("--notify-max-delay must not be negative")
        if self.notify_url:
            from gembatch.server.webhook_targets import check_target_now

            problem = check_target_now(self.notify_url, allow_private=self.notify_allow_private)
            if problem is not None:
                raise UserError(f"--notify-url {problem}")


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address literal (`127.0.0.1`, `::1`, `[::1]`). Not the
    empty host, which means every interface."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


def load_tokens(path: Path | None, env: str | None = None) -> dict[str, str]:
    """Tokens from a file (one `TOKEN USER` per line, `#` comments) and/or
    $GEMBATCH_TOKENS (`token:user,token2:user2`)."""
    tokens: dict[str, str] = {}
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot read tokens file {path}: {exc.strerror}") from None
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise UserError(f"{path}:{number}: expected `TOKEN USER`, got {line!r}")
            tokens[parts[0]] = parts[1]
    env = os.environ.get("GEMBATCH_TOKENS", "") if env is None else env
    for item in filter(None, (part.strip() for part in env.split(","))):
        token, sep, user = item.partition(":")
        if not sep or not token or not user:
            raise UserError("GEMBATCH_TOKENS must look like token:user,token2:user2")
        tokens[token] = user
    for token in tokens:
        if len(token) < 16:
            raise UserError("API tokens must be at least 16 characters long")
    return tokens
