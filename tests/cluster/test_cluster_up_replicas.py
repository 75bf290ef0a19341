"""`shardq cluster up --replicas 1`: one supervisor, every broker followed (docs/design.md §12)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import http_get, poll
from tests.conftest import Proc


@pytest.mark.timeout(180)
def test_cluster_up_with_replicas_1_puts_every_broker_in_sync(
        procs: list[Proc], tmp_path: Path) -> None:
    p = Proc(["cluster", "up", "-n", "2", "--replicas", "1", "--data-dir", str(tmp_path / "data"),
              "--coordinator-port", "0", "--base-port", "0"],
             log_path=tmp_path / "supervisor.log")
    procs.append(p)

    def in_sync() -> dict[str, Any] | None:
        rep = http_get(p.addr, "/replication") or {}
        return rep if len(rep) == 2 and all(r.get("in_sync") for r in rep.values()) else None

    rep = poll(in_sync, "both brokers in sync", 90)
    assert {r["follower"] for r in rep.values()} == set(rep), rep
