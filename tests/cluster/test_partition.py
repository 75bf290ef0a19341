"""A network partition with `--replicas 1` (docs/design.md §12, guarantee 9 of §9).

Hosts are network namespaces (tests/netns.py): the coordinator, the
follower and the other broker run in the root namespace; the primary runs in
its own namespace `p`, linked to the root by one veth pair and to a client
namespace `c` by another (no forwarding between the two, so the client never
reaches the coordinator). Cutting the root link partitions the primary away
from the coordinator and its follower while the client still reaches it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardq.codec import encode_frame
from tests.cluster.conftest import poll
from tests.cluster.test_replication import Replicated, add_jobs, add_until_served, job_ids
from tests.conftest import Proc, queue_on
from tests.integration.rawwire import RawConn, add_args
from tests.netns import Lab, unavailable

PRIMARY = "b2"
HOLD_S = 8.0  # how long a write the partitioned primary holds is watched for an answer


@pytest.fixture
def lab() -> Iterator[Lab]:
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"partition test skipped: {reason}")
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


class Partitioned(Replicated):
    """`Replicated`, with PRIMARY in namespace `p` and a client namespace `c`."""

    def __init__(self, procs: list[Proc], start_broker: Any, tmp_path: Path, lab: Lab) -> None:
        self.lab = lab
        self.p = lab.host("p")
        self.c = lab.host("c")
        self.uplink = lab.link(None, self.p)  # root .1 <-> p .2
        self.root_addr, self.p_addr = self.uplink.addr_a, self.uplink.addr_b
        client_link = lab.link(self.c, self.p, "10.216.0.0/30")  # c .1 <-> p .2
        lab.route(self.c, f"{self.p_addr}/32", client_link.addr_b)
        super().__init__(procs, start_broker, tmp_path)

    def _coordinator(self, port: int, env: dict[str, str] | None = None) -> Proc:
        p = Proc(["coordinator", "--port", str(port), "--bind", self.root_addr,
                  "--data-dir", str(self.tmp_path / "coord"), "--expect", str(self.n),
                  "--replicas", "1", "--heartbeat-timeout-ms", "1500"],
                 env=env, log_path=self.tmp_path / "coord.log")
        self._procs.append(p)
        return p

    def start(self, bid: str, env: dict[str, str] | None = None) -> Proc:
        self.journals[bid] = self.tmp_path / f"acks-{bid}.tsv"
        full_env = {"SHARDQ_ACK_JOURNAL": str(self.journals[bid]), "SHARDQ_LOG_LEVEL": "INFO",
                    **(env or {})}
        if bid != PRIMARY:
            self.brokers[bid] = self._start_broker(
                bid, "--coordinator", self.url, "--bind", self.root_addr,
                data_dir=self.data_dir(bid), env=full_env)
            return self.brokers[bid]
        ddir = self.data_dir(bid)
        ddir.mkdir(parents=True, exist_ok=True)
        proc = Proc(["broker", "--id", bid, "--port", "0", "--bind", self.p_addr,
                     "--data-dir", str(ddir), "--coordinator", self.url],
                    env=full_env, log_path=self.tmp_path / f"{bid}-netns.log",
                    prefix=self.lab.exec_prefix(self.p))
        self._procs.append(proc)
        self.brokers[bid] = proc
        return proc

    def client(self, addr: str) -> RawConn:
        """A connection to `addr` from the client namespace."""
        return self.lab.call_in(self.c, lambda: RawConn(addr, timeout=10.0))


def answer_within(conn: RawConn, rid: int, seconds: float) -> list[Any] | None:
    """The reply to request `rid`, or None: no answer in `seconds`, or closed."""
    conn.sock.settimeout(seconds)
    try:
        while True:
            frame = conn.recv_frame()
            if frame[0] == rid:
                return frame  # type: ignore[no-any-return]
    except OSError:  # a timeout, or the connection closed
        return None


@pytest.mark.timeout(240)
def test_partitioned_primary_answers_no_write_after_the_fence_and_loses_nothing(
        lab: Lab, procs: list[Proc], start_broker: Any, tmp_path: Path) -> None:
    c = Partitioned(procs, start_broker, tmp_path, lab)
    follower = c.replication()[PRIMARY]["follower"]
    topo = c.topology()
    queue = queue_on(topo, PRIMARY, "part")
    addr = topo.brokers[PRIMARY].addr
    assert addr.startswith(c.p_addr + ":"), addr
    acknowledged = set(asyncio.run(add_jobs(c, queue, 20)))
    conn = c.client(addr)
    for i in range(5):  # the client's path works, and its writes are on both disks
        conn.ok("ADD", add_args(queue, f"c{i}"))
        acknowledged.add(f"c{i}")

    c.lab.cut(c.uplink)
    # Sent at once: the follower can no longer have it, so it is never answered.
    conn.send_raw(encode_frame([1001, "ADD", add_args(queue, "cut")]))
    poll(lambda: (c.replication().get(PRIMARY, {}).get("failover") or {})
         .get("phase") == "done", "the failover of the partitioned primary", 60)
    assert c.topology().owner_of(queue) == follower
    # The fenced follower serves the slots; the old primary is still reachable
    # from the client side (HELLO answered on a new connection), and answers
    # no write there.
    late = c.client(addr)
    late.send_raw(encode_frame([2001, "ADD", add_args(queue, "late")]))
    early_reply = answer_within(conn, 1001, HOLD_S)
    late_reply = answer_within(late, 2001, 1.0)
    assert early_reply is None or early_reply[1] != "ok", early_reply
    assert late_reply is None or late_reply[1] != "ok", late_reply
    c.lab.heal(c.uplink)
    # Back in touch, it learns it was fenced and gives the slots up; what it
    # held is refused or dropped, never answered.
    for cn, rid, reply in ((conn, 1001, early_reply), (late, 2001, late_reply)):
        if reply is None:
            again = answer_within(cn, rid, HOLD_S)
            assert again is None or again[1] != "ok", again
    asyncio.run(add_until_served(c, queue, "after", time.monotonic(), 30))
    got = asyncio.run(job_ids(c, queue))
    assert acknowledged | {"after"} <= got, sorted(acknowledged - got)
    assert {k for k, n in c.acks().items() if n > 1} == set()
