"""`shardq cluster up`: a real supervisor, coordinator, three brokers (docs/design.md §8, §10)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shardq.router import NUM_SLOTS, Ring, Topology, slot_of

from ..conftest import Proc
from .conftest import http_get, poll

pytestmark = pytest.mark.slow

WAIT_S = 30.0
QUEUES = ["emails", "enrich", "webhook", "tenant-7:reports"]


# The `cluster` fixture (`cluster up -n 3` on free ports) lives in conftest.py.


def cli(*args: str) -> Any:
    """Run the real `shardq` CLI and parse its JSON output."""
    r = subprocess.run([sys.executable, "-m", "shardq", *args], capture_output=True, text=True,
                       timeout=WAIT_S, check=False)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


wait_until = poll  # the cluster conftest's helpers, under this file's names
get = http_get


def children(pid: int) -> dict[str, int]:
    """The supervisor's children by name (coordinator, b1...), from /proc (Linux)."""
    out: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
            continue
        args = [a.decode() for a in argv]
        if "coordinator" in args:
            out["coordinator"] = int(entry.name)
        elif "--id" in args:
            out[args[args.index("--id") + 1]] = int(entry.name)
    return out


def test_cluster_up_bootstraps_three_active_brokers_owning_every_slot(cluster: Proc) -> None:
    url = cluster.addr
    status = cli("status", "--json", "--coordinator", url)

    assert status["epoch"] >= 1
    brokers = status["brokers"]
    assert [b["id"] for b in brokers] == ["b1", "b2", "b3"]
    assert {b["state"] for b in brokers} == {"active"}
    assert sum(b["slots"] for b in brokers) == NUM_SLOTS
    assert all(b["slots"] > 0 for b in brokers)
    assert len({b["addr"] for b in brokers}) == 3

    ring = Ring({"b1": 1, "b2": 1, "b3": 1})
    addrs = {b["id"]: b["addr"] for b in brokers}
    for queue in QUEUES:
        owner = cli("owner", queue, "--json", "--coordinator", url)
        slot = slot_of(queue)
        assert owner == {"queue": queue, "slot": slot, "broker": ring.target(slot),
                         "addr": addrs[ring.target(slot)], "epoch": 1}


def test_coordinator_killed_and_restarted_keeps_ownership(cluster: Proc) -> None:
    url = cluster.addr
    before = get(url, "/topology")
    health = get(url, "/healthz")
    assert health["term"] == 1

    os.kill(health["pid"], signal.SIGKILL)

    # The supervisor restarts it on the same port, with term + 1.
    health2 = wait_until(lambda: (h := get(url, "/healthz")) and h["term"] == 2 and h,
                         "the coordinator to come back with term 2")
    assert health2["pid"] != health["pid"]
    after = get(url, "/topology")
    assert after["slots"] == before["slots"]
    assert after["epoch"] == before["epoch"]
    assert Topology.from_dict(after).slot_counts() == Topology.from_dict(before).slot_counts()
    status = wait_until(
        lambda: (s := get(url, "/status")) and all(b["state"] == "active" for b in s["brokers"])
        and s, "brokers active after the restart")
    assert len(status["brokers"]) == 3


def test_supervisor_restarts_a_broker_that_dies_on_its_port(cluster: Proc) -> None:
    url = cluster.addr
    before = get(url, "/status")
    pids = children(cluster.pid)
    assert set(pids) == {"coordinator", "b1", "b2", "b3"}

    os.kill(pids["b2"], signal.SIGKILL)

    wait_until(lambda: (p := children(cluster.pid).get("b2")) != pids["b2"] and p,
               "b2 restarted by the supervisor")
    host, _, port = next(b["addr"] for b in before["brokers"] if b["id"] == "b2").rpartition(":")
    wait_until(lambda: _accepts(host, int(port)), "b2 listening again on its port")
    status = get(url, "/status")
    assert status["brokers"] == [
        {**b, **{k: status["brokers"][i][k] for k in ("queues", "waiting", "active", "delayed")}}
        for i, b in enumerate(before["brokers"])
    ]  # same addrs, states and slots: a broker restart moves nothing
    assert status["epoch"] == before["epoch"]


def test_sigterm_stops_every_child(cluster: Proc) -> None:
    pids = children(cluster.pid)
    assert len(pids) == 4

    assert cluster.terminate(timeout=WAIT_S) == 0

    for name, pid in pids.items():
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"{name} still runs"


def test_cluster_up_again_on_the_same_data_dir_keeps_ownership(
        procs: list[Proc], tmp_path: Path) -> None:
    args = ["cluster", "up", "-n", "3", "--data-dir", str(tmp_path / "data"),
            "--coordinator-port", "0", "--base-port", "0"]
    first = Proc(args, log_path=tmp_path / "supervisor.log")
    procs.append(first)
    before = get(first.addr, "/topology")
    assert first.terminate(timeout=WAIT_S) == 0

    second = Proc(args, log_path=tmp_path / "supervisor.log")
    procs.append(second)

    after = get(second.addr, "/topology")
    assert after["term"] == before["term"] + 1
    # New free ports mean new addresses: epochs move on, ownership does not.
    assert Topology.from_dict(after).slot_owners == Topology.from_dict(before).slot_owners
    assert after["epoch"] > before["epoch"]
    assert {b["state"] for b in after["brokers"].values()} == {"active"}


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except OSError:
        return False
    return True


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_status_table_keeps_whole_headers_in_80_columns(cluster: Proc) -> None:
    r = subprocess.run([sys.executable, "-m", "shardq", "status", "--coordinator", cluster.addr],
                       capture_output=True, text=True, timeout=WAIT_S, check=False,
                       env={**os.environ, "COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, r.stdout
    header = next(line for line in lines if "state" in line)
    for col in ("id", "addr", "state", "weight", "slots", "queues", "waiting", "active",
                "delayed"):
        assert col in header.split(), (col, header)


def test_status_counts_are_live_right_after_a_burst_of_adds(cluster: Proc) -> None:
    import asyncio

    import shardq

    async def burst() -> None:
        async with await shardq.connect(cluster.addr) as client:
            await client.queue("status-burst").add_bulk([("n", {})] * 500)

    asyncio.run(burst())
    status = cli("status", "--json", "--coordinator", cluster.addr)  # no heartbeat wait
    assert status["live"] is True
    assert sum(b["waiting"] for b in status["brokers"]) == 500
