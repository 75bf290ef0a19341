"""Where tokens come from: an option, a file, or the environment.

Two roles (docs/design.md §4, README "Security"): the *client* token lets
producers and workers use queues; the *control* token is for the
coordinator, brokers among themselves and the admin CLI, and is the only
one that may send handoff, ownership and term ops. A token on a command
line is readable by every local user in /proc/PID/cmdline, so `cluster up`
passes token *files*; a file or an environment variable is the recommended
way for every process.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

CLIENT_TOKEN_ENV = "SHARDQ_TOKEN"
CONTROL_TOKEN_ENV = "SHARDQ_CONTROL_TOKEN"


class TokenError(ValueError):
    """A token file that cannot be used (missing, unreadable, empty)."""


def read_token_file(path: str | Path) -> str:
    """The token in `path`: its first line, surrounding whitespace removed.

    Raises:
        TokenError: the file cannot be read or holds no token.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TokenError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise TokenError(f"token file {path} is empty")
    return token


def resolve(value: str | None, file: str | Path | None) -> str | None:
    """The token in `file` when one is given, else the one given directly
    (an option or its environment variable, which a child process may
    inherit from a parent that passes it a file)."""
    if file is not None:
        return read_token_file(file)
    return value or None


def resolve_pair(token: str | None, token_file: str | None, control: str | None,
                 control_file: str | None) -> tuple[str | None, str | None]:
    """(client token, control token) of a server command's options."""
    return resolve(token, token_file), resolve(control, control_file)


def write_token_file(path: Path, token: str) -> Path:
    """Write `token` to `path`, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return path


def new_token() -> str:
    return secrets.token_urlsafe(32)
