"""How `shardq scale out|in` reaches a local `shardq cluster up` (docs/design.md §8, §10).

`cluster up` records itself in `DATA_DIR/cluster.json`::

    {"pid": supervisor pid, "coordinator": "http://host:port",
     "control": "127.0.0.1:port", "brokers": ["b1", ...], "removed": ["b4", ...]}

`brokers` are the brokers it supervises (a scale out adds to it, so the next
`cluster up` on that data dir starts them again); `removed` are brokers
scaled in, never started again and never reused as names.

`control` is a loopback TCP port speaking one JSON object per line, one
JSON reply per line (the cluster's `--token`, if any, goes in `token`)::

    {"op": "add", "count": n}   -> {"ok": true, "brokers": [{"id", "addr"}, ...]}
                                   starts b(N+1)..., answers once each printed READY
    {"op": "stop", "id": "b4"}  -> {"ok": true, "id": "b4", "code": exit code}
                                   SIGTERM, wait for the exit, never restart it
    {"op": "list"}              -> {"ok": true, "brokers": [{"id", "addr", "pid"}, ...]}
    (any failure)               -> {"ok": false, "error": "..."}

The server half lives in supervisor.py; this module has the file and the
client half (synchronous, for the CLI).

So that `shardq scale out|in --coordinator URL` finds the cluster without
`--data-dir`, whatever the current directory, `cluster up` also leaves a
pointer in a per-user registry (`~/.local/state/shardq/clusters/`, or
`$SHARDQ_STATE_DIR/clusters/`): one file per coordinator URL naming the
data dir. A pointer whose supervisor is gone is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from shardq.secrets import TokenError, read_token_file

CLUSTER_FILE = "cluster.json"
MAX_LINE = 1 << 20


class ControlError(Exception):
    """The local cluster could not be reached, or refused the request."""


@dataclass(slots=True)
class ClusterFile:
    """The contents of DATA_DIR/cluster.json."""

    pid: int = 0
    coordinator: str = ""
    control: str = ""
    brokers: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, data_dir: Path) -> ClusterFile | None:
        """The file's contents; None when there is none (or it is unreadable)."""
        try:
            d = json.loads((data_dir / CLUSTER_FILE).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(d, dict):
            return None
        return cls(int(d.get("pid", 0)), str(d.get("coordinator", "")),
                   str(d.get("control", "")), [str(b) for b in d.get("brokers", [])],
                   [str(b) for b in d.get("removed", [])])

    def write(self, data_dir: Path) -> None:
        """Replace the file atomically."""
        tmp = data_dir / (CLUSTER_FILE + ".tmp")
        tmp.write_text(json.dumps({"pid": self.pid, "coordinator": self.coordinator,
                                   "control": self.control, "brokers": self.brokers,
                                   "removed": self.removed}, indent=1))
        os.replace(tmp, data_dir / CLUSTER_FILE)


# `cluster up --token` keeps its tokens here, under DATA_DIR/secrets (0600).
CLIENT_TOKEN_FILE = "client.token"
CONTROL_TOKEN_FILE = "control.token"
COORDINATOR_TOKEN_FILE = "coordinator.token"


def url_key(url: str) -> str:
    """A coordinator URL as the registry matches it (localhost is 127.0.0.1)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    host = parts.hostname or ""
    host = "127.0.0.1" if host in ("localhost", "::1", "0.0.0.0") else host
    return f"{host}:{parts.port or 80}"


def register(registry: Path, coordinator: str, data_dir: Path) -> None:
    """Point the registry at `data_dir` for `coordinator` (atomically)."""
    registry.mkdir(parents=True, exist_ok=True)
    key = url_key(coordinator)
    name = hashlib.sha1(key.encode()).hexdigest()[:16] + ".json"
    tmp = registry / (name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"coordinator": key, "data_dir": str(data_dir.resolve())}))
    os.replace(tmp, registry / name)


def find_registered(registry: Path, coordinator: str) -> Path | None:
    """The data dir of a running `cluster up` whose coordinator is `coordinator`."""
    key = url_key(coordinator)
    path = registry / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".json")
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    data_dir = Path(str(entry.get("data_dir", ""))) if isinstance(entry, dict) else None
    info = ClusterFile.read(data_dir) if data_dir is not None else None
    if info is None or url_key(info.coordinator) != key or not _alive(info.pid):
        return None
    return data_dir


class LocalCluster:
    """A running `cluster up`, found through its data dir.

    Args:
        data_dir: the `--data-dir` it was started with.
        token: the cluster's token, if it has one.

    Raises:
        ControlError: no cluster.json, or its supervisor is not running.
    """

    def __init__(self, data_dir: Path, token: str | None = None) -> None:
        info = ClusterFile.read(data_dir)
        if info is None:
            raise ControlError(f"no local cluster in {data_dir} (no {CLUSTER_FILE}); "
                               "start one with `shardq cluster up --data-dir DIR`")
        if not info.control or not _alive(info.pid):
            raise ControlError(f"the local cluster of {data_dir} is not running "
                               f"(supervisor pid {info.pid})")
        self.data_dir = data_dir
        self.info = info
        self._token = token

    @property
    def coordinator(self) -> str:
        return self.info.coordinator

    def coordinator_token(self) -> str | None:
        """The control token `cluster up` made (admin calls change state), if
        it made one and this user can read it; else the token given."""
        try:
            return read_token_file(self.data_dir / "secrets" / CONTROL_TOKEN_FILE)
        except TokenError:
            return self._token

    def add(self, count: int, timeout_s: float = 120.0) -> list[dict[str, Any]]:
        """Start `count` new brokers; returns [{id, addr}] once each is listening."""
        brokers: list[dict[str, Any]] = self.call({"op": "add", "count": count},
                                                  timeout_s)["brokers"]
        return brokers

    def stop(self, broker_id: str, timeout_s: float = 60.0) -> int | None:
        """Stop a supervised broker for good (SIGTERM); returns its exit code."""
        code: int | None = self.call({"op": "stop", "id": broker_id}, timeout_s).get("code")
        return code

    def brokers(self) -> list[dict[str, Any]]:
        """[{id, addr, pid}] of the supervised brokers."""
        brokers: list[dict[str, Any]] = self.call({"op": "list"}, 10.0)["brokers"]
        return brokers

    def call(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """One request, one reply.

        Raises:
            ControlError: unreachable, or `{"ok": false}`.
        """
        host, _, port = self.info.control.rpartition(":")
        body = dict(request, token=self._token) if self._token else request
        try:
            with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
                sock.sendall(json.dumps(body).encode() + b"\n")
                with sock.makefile("rb") as f:
                    line = f.readline(MAX_LINE)
        except (OSError, ValueError) as e:
            raise ControlError(f"cannot reach the local cluster's control port "
                               f"{self.info.control}: {e}") from e
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise ControlError(f"bad answer from the control port: {line[:200]!r}")
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error", "refused")))
        return reply


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
