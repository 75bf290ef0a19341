"""Multi-host without containers: the coordinator and each broker in its own network
namespace on one bridge (tests/deploy/netns.py), so every registration, heartbeat, handoff
and client request crosses a network. Scale out to a 4th host, scale one in; every job
pushed before completes exactly once.

Brokers start as in deploy/ (`shardq deploy broker --id bN --port 7101 --advertise-host
10.213.0.N -- --bind 10.213.0.N`): the same port on every host, told apart by address.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.aio import run
from tests.cluster.conftest import poll, synced_topology
from tests.conftest import Proc

from . import netns
from .workload import push, serving, slots_by_broker, work

pytestmark = pytest.mark.slow

PORT = 7101


@pytest.fixture
def lan(procs: list[Proc]) -> Iterator[netns.Lan]:
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(reason)
    lan = netns.Lan()
    try:
        yield lan
    finally:
        for p in procs:  # the processes go before their namespaces do
            p.close()
        lan.close()
        assert netns.leftovers(lan.token) == []


class Hosts:
    """The cluster's hosts: one namespace per process."""

    def __init__(self, lan: netns.Lan, procs: list[Proc], tmp_path: Path) -> None:
        self.lan, self._procs, self._tmp = lan, procs, tmp_path
        self.client, _ = lan.host("client", 100)
        coord_ns, coord_ip = lan.host("coord", 1)
        self.coordinator = self._start(coord_ns, "coordinator", [
            "coordinator", "--bind", coord_ip, "--port", "7070",
            "--data-dir", str(tmp_path / "coord"), "--expect", "3",
            "--rebalance-concurrency", "8"])
        self.url = f"http://{self.coordinator.addr}"
        self.brokers: dict[str, tuple[netns.Netns, Proc]] = {}

    def broker(self, broker_id: str, octet: int) -> str:
        ns, ip = self.lan.host(broker_id, octet)
        p = self._start(ns, broker_id, [
            "deploy", "broker", "--id", broker_id, "--data-root", str(self._tmp / "data"),
            "--coordinator", self.url, "--port", str(PORT), "--advertise-host", ip,
            "--id-file", str(self._tmp / f"{broker_id}.id"), "--", "--bind", ip])
        self.brokers[broker_id] = (ns, p)
        return p.addr

    def _start(self, ns: netns.Netns, name: str, args: list[str]) -> Proc:
        p = ns.call(Proc, args, log_path=self._tmp / f"{name}.log")
        self._procs.append(p)
        return p

    def on_client(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Run `fn` on the client host: the LAN is reachable from its hosts only."""
        return self.client.call(fn, *args, **kwargs)


def test_scale_out_and_in_across_hosts_keeps_every_job_exactly_once(
        lan: netns.Lan, procs: list[Proc], tmp_path: Path) -> None:
    hosts = Hosts(lan, procs, tmp_path)
    assert hosts.url == "http://10.213.0.1:7070"
    with ThreadPoolExecutor(3) as pool:
        addrs = list(pool.map(hosts.broker, ["b1", "b2", "b3"], [11, 12, 13]))
    assert addrs == ["10.213.0.11:7101", "10.213.0.12:7101", "10.213.0.13:7101"]
    first = {"b1", "b2", "b3"}
    hosts.on_client(poll, lambda: serving(hosts.url, first), "bootstrap across hosts")
    topo = hosts.on_client(synced_topology, hosts.url, tuple(sorted(first)))
    assert [topo.brokers[b].addr for b in ("b1", "b2", "b3")] == addrs
    pushed = hosts.on_client(run, push(hosts.url))

    # Scale out: a 4th host joins and gets its share of slots, jobs and all.
    assert hosts.broker("b4", 14) == "10.213.0.14:7101"
    hosts.on_client(poll, lambda: serving(hosts.url, first | {"b4"}), "the rebalance onto b4")

    # Scale in: b2's slots move to the others over the network, then it stops.
    b2_ns, b2 = hosts.brokers["b2"]
    r = b2_ns.call(subprocess.run, [sys.executable, "-m", "shardq", "deploy", "drain",
                                    "--id", "b2", "--coordinator", hosts.url, "--timeout", "60"],
                   capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "b2 drained" in r.stderr
    assert b2.terminate() == 0
    rows = hosts.on_client(slots_by_broker, hosts.url)
    assert rows["b2"] == ("drained", 0)
    assert {b: state for b, (state, _) in rows.items()} == {
        "b1": "active", "b2": "drained", "b3": "active", "b4": "active"}
    assert all(rows[b][1] > 0 for b in ("b1", "b3", "b4"))
    r = hosts.on_client(subprocess.run, [
        sys.executable, "-m", "shardq", "deploy", "remove-drained", "b2", "b3",
        "--coordinator", hosts.url], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr  # b3 serves: kept
    assert "b2: removed" in r.stderr and "b3: kept" in r.stderr
    assert "b2" not in hosts.on_client(slots_by_broker, hosts.url)

    handled, totals = hosts.on_client(run, work(hosts.url, len(pushed)))
    assert set(handled) == pushed
    assert max(handled.values()) == 1, "a job ran twice"
    assert totals["completed"] == len(pushed) and totals["waiting"] == totals["active"] == 0
