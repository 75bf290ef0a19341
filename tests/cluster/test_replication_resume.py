"""A restarted follower resumes from its last durable seq (docs/design.md §12).

kill -9 of a follower, writes meanwhile (answered alone once the coordinator
recorded it out of sync), a restart on its data directory: the primary ships
it what it lacks from its in-memory tail, not a whole snapshot, the pair is
in sync again, and a switchover to the follower finds every job.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from shardq import protocol
from tests.cluster.conftest import poll
from tests.cluster.test_replication import Replicated, add_jobs, job_ids
from tests.conftest import Proc, queue_on
from tests.integration.rawwire import RawConn, add_args


class SlowDetection(Replicated):
    """A follower restarted within the heartbeat timeout stays the follower
    (the coordinator would replace a dead one)."""

    def _coordinator(self, port: int, env: dict[str, str] | None = None) -> Proc:
        p = Proc(["coordinator", "--port", str(port), "--data-dir", str(self.tmp_path / "coord"),
                  "--expect", str(self.n), "--replicas", "1", "--heartbeat-timeout-ms", "30000"],
                 env=env, log_path=self.tmp_path / "coord.log")
        self._procs.append(p)
        return p


def link_stats(c: Replicated, bid: str) -> dict[str, Any]:
    conn = RawConn(c.topology().brokers[bid].addr)
    try:
        link: dict[str, Any] = conn.ok("STATS", {})["replication"]["link"]
        return link
    finally:
        conn.close()


@pytest.mark.timeout(240)
def test_a_restarted_follower_resumes_from_its_seq_without_a_snapshot(
        procs: list[Proc], start_broker: Any, tmp_path: Path) -> None:
    c = SlowDetection(procs, start_broker, tmp_path, brokers=("b1", "b2"))
    primary, follower = "b1", c.replication()["b1"]["follower"]
    queue = queue_on(c.topology(), primary, "resume")
    acknowledged = set(asyncio.run(add_jobs(c, queue, 30)))
    before = link_stats(c, primary)
    assert before["snapshots"] == 1 and before["resumes"] == 0, before
    c.brokers[follower].kill()
    conn = RawConn(c.topology().brokers[primary].addr, timeout=30.0)
    for i in range(10):  # answered alone, once the coordinator recorded it out of sync
        conn.ok("ADD", add_args(queue, f"alone{i}"))
        acknowledged.add(f"alone{i}")
    conn.close()
    assert not c.replication()[primary]["in_sync"]
    c.start(follower)
    c.wait_in_sync((primary,))
    after = link_stats(c, primary)
    assert after["snapshots"] == 1, f"a full snapshot was sent again: {after}"
    assert after["resumes"] == 1, after
    acknowledged |= set(asyncio.run(add_jobs(c, queue, 5)))  # j0..j4 again: idempotent
    # The follower's copy is complete: a switchover to it finds every job.
    r = httpx.post(f"{c.url}/brokers/{primary}/failover", json={}, timeout=60)
    assert r.status_code == 200, r.text
    poll(lambda: c.topology().owner_of(queue) == follower, "the switchover")
    got = asyncio.run(job_ids(c, queue))
    assert acknowledged <= got, sorted(acknowledged - got)


def replica_stats(c: Replicated, bid: str, primary: str) -> dict[str, Any]:
    conn = RawConn(c.topology().brokers[bid].addr)
    try:
        rep: dict[str, Any] = conn.ok("STATS", {})["replication"]["replicas"][primary]
        return rep
    finally:
        conn.close()


@pytest.mark.timeout(240)
def test_the_replica_file_is_checkpointed_and_a_restart_recovers_from_it(
        procs: list[Proc], start_broker: Any, tmp_path: Path) -> None:
    c = SlowDetection(procs, start_broker, tmp_path, brokers=("b1", "b2"))
    primary, follower = "b1", c.replication()["b1"]["follower"]
    queue = queue_on(c.topology(), primary, "ckpt")
    added = asyncio.run(add_jobs(c, queue, 60))  # one batch each
    conn = RawConn(c.topology().brokers[primary].addr)
    pulled = conn.ok("PULL", {"queues": [queue], "count": 5, "lock_ms": 60_000})
    done = {j[protocol.J_ID] for j in pulled}
    acked = conn.ok("ACK", {"items": [[queue, j[protocol.J_ID], j[protocol.J_TOKEN], None]
                                      for j in pulled]})
    assert acked == [None] * 5, acked
    conn.close()
    assert replica_stats(c, follower, primary)["log_rows"] > 60
    # Idle for a second, the replica checkpoints: its log is folded into its tables.
    poll(lambda: replica_stats(c, follower, primary)["log_rows"] <= 1, "a replica checkpoint")
    c.brokers[follower].kill()
    conn = RawConn(c.topology().brokers[primary].addr, timeout=30.0)
    conn.ok("ADD", add_args(queue, "alone"))  # the primary notices, answers alone
    conn.close()
    assert not c.replication()[primary]["in_sync"]
    c.start(follower)  # recovers from the checkpoint (and the log since)
    c.wait_in_sync((primary,))
    assert replica_stats(c, follower, primary)["jobs"] == 61
    link = link_stats(c, primary)
    assert (link["snapshots"], link["resumes"]) == (1, 1), link
    r = httpx.post(f"{c.url}/brokers/{primary}/failover", json={}, timeout=60)
    assert r.status_code == 200, r.text
    poll(lambda: c.topology().owner_of(queue) == follower, "the switchover")
    assert asyncio.run(job_ids(c, queue)) == (set(added) - done) | {"alone"}
