"""Cluster fixtures: `cluster up` (one supervisor), or a coordinator and brokers apart.

Both read every address from a `READY` line (docs/design.md §8) and are killed by pid
at teardown through the `procs` fixture (tests/conftest.py).

- `cluster`: `shardq cluster up -n 3` on free ports; `.addr` is the coordinator URL.
- `split_cluster`: a coordinator and b1..b3 as separate `Proc`s, so a test
  can kill -9 and restart one of them by itself (same data dir, and the same
  port for the coordinator, since brokers were given its URL).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shardq.router import Topology
from tests.integration.rawwire import RawConn

from ..conftest import Proc

WAIT_S = 30.0
BROKERS = ("b1", "b2", "b3")


@pytest.fixture
def cluster(procs: list[Proc], tmp_path: Path) -> Iterator[Proc]:
    """`cluster up -n 3` on free ports; `.addr` is the coordinator URL from READY."""
    p = Proc(["cluster", "up", "-n", "3", "--data-dir", str(tmp_path / "data"),
              "--coordinator-port", "0", "--base-port", "0"],
             log_path=tmp_path / "supervisor.log")
    procs.append(p)
    assert p.addr.startswith("http://")
    yield p


def poll(cond: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    """Poll `cond` until truthy (process and HTTP states have no event to await)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def http_get(url: str, path: str) -> Any:
    """GET a coordinator path as JSON; None while it is unreachable or not 200."""
    try:
        r = httpx.get(url + path, timeout=5.0)
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


def broker_epoch(addr: str) -> int:
    """The topology epoch a broker serves with (0: no map yet, or unreachable)."""
    try:
        conn = RawConn(addr, timeout=5.0)
    except OSError:
        return 0
    try:
        topo = conn.ok("TOPOLOGY", {})
    except (OSError, ConnectionError):
        return 0
    finally:
        conn.close()
    return int(topo["epoch"]) if topo else 0


def synced_topology(url: str, brokers: tuple[str, ...] = BROKERS) -> Topology:
    """The coordinator's topology once every broker owns slots and serves with that epoch.

    A broker learns the map on its next heartbeat after bootstrap; until
    then it answers TRYAGAIN, which the client rides out but raw-wire checks
    must not see.
    """
    def ready() -> Topology | None:
        body = http_get(url, "/topology")
        if not body:
            return None
        topo = Topology.from_dict(body)
        counts = topo.slot_counts()
        if not all(counts.get(b, 0) > 0 for b in brokers):
            return None
        if any(broker_epoch(topo.brokers[b].addr) != topo.epoch for b in brokers):
            return None
        return topo

    topo: Topology = poll(ready, "every broker to serve the coordinator's map")
    return topo


class SplitCluster:
    """A coordinator and brokers b1..b3, each its own process (see `split_cluster`)."""

    def __init__(self, procs: list[Proc], start_broker: Callable[..., Proc],
                 tmp_path: Path) -> None:
        self._procs = procs
        self._start_broker = start_broker
        self.tmp_path = tmp_path
        self.coordinator_dir = tmp_path / "coordinator"
        self.coordinator = self._start_coordinator(0)
        self.url = f"http://{self.coordinator.addr}"
        self.brokers = {b: self._broker(b) for b in BROKERS}

    def _start_coordinator(self, port: int) -> Proc:
        p = Proc(["coordinator", "--port", str(port), "--data-dir", str(self.coordinator_dir),
                  "--expect", str(len(BROKERS))],
                 log_path=self.tmp_path / "coordinator.log")
        self._procs.append(p)
        return p

    def _broker(self, broker_id: str) -> Proc:
        # INFO: tests read the membership agent's link changes from the log.
        return self._start_broker(broker_id, "--coordinator", self.url,
                                  data_dir=self.broker_dir(broker_id),
                                  env={"SHARDQ_LOG_LEVEL": "INFO"})

    def broker_dir(self, broker_id: str) -> Path:
        return self.tmp_path / f"{broker_id}-data"

    def restart_coordinator(self) -> Proc:
        """Start the coordinator again on its data dir and port (the brokers know its URL)."""
        assert not self.coordinator.alive(), "kill it first"
        self.coordinator = self._start_coordinator(self.coordinator.port)
        return self.coordinator

    def restart_broker(self, broker_id: str) -> Proc:
        """Start `broker_id` again on its data dir, on a new free port."""
        assert not self.brokers[broker_id].alive(), "kill it first"
        self.brokers[broker_id] = self._broker(broker_id)
        return self.brokers[broker_id]

    def log_tail(self, n: int = 3000) -> str:
        """The end of every process log, for assertion messages."""
        parts = []
        for p in self._procs:
            if p.log_path is not None and p.log_path.exists():
                text = p.log_path.read_text(errors="replace")[-n:]
                parts.append(f"--- {p.log_path.name}\n{text}")
        return "\n".join(parts)


@pytest.fixture
def split_cluster(procs: list[Proc], start_broker: Callable[..., Proc],
                  tmp_path: Path) -> SplitCluster:
    """A coordinator (`--expect 3`) and b1..b3 as separate processes, bootstrapped and synced."""
    c = SplitCluster(procs, start_broker, tmp_path)
    synced_topology(c.url)
    return c
