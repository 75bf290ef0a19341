"""Failpoints: deterministic crash/sleep/error injection (docs/design.md §9).

Configured once from `SHARDQ_FAILPOINTS="name=action,name=action"` by the
CLI layer. Call sites guard with `if failpoints.ACTIVE:` so an unset
variable costs one global lookup. Actions: `kill` (SIGKILL ourselves, as
`kill -9` would), `sleep(ms)`, `error` (raise FailpointError).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time

ACTIVE: dict[str, str] = {}

_ACTION = re.compile(r"^(kill|error|sleep\((\d+)\))$")


class FailpointError(RuntimeError):
    """Raised by a failpoint whose action is `error`."""


def configure(spec: str | None) -> None:
    """Parse a spec string; raises ValueError on a malformed one."""
    ACTIVE.clear()
    if not spec:
        return
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, action = part.partition("=")
        if not sep or not name.strip() or not _ACTION.match(action.strip()):
            raise ValueError(f"bad failpoint {part!r}: expected name=kill|error|sleep(ms)")
        ACTIVE[name.strip()] = action.strip()


def hit(name: str) -> None:
    """Run the action configured for `name`, if any."""
    action = ACTIVE.get(name)
    if action is None:
        return
    if action == "kill":
        sys.stderr.write(f"failpoint {name}: kill\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "error":
        raise FailpointError(f"failpoint {name}")
    else:
        m = _ACTION.match(action)
        assert m is not None and m.group(2) is not None
        time.sleep(int(m.group(2)) / 1000.0)
