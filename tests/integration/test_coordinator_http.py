"""The coordinator's HTTP API and the admin CLI against a real `shardq coordinator` process."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from shardq.cli import app
from shardq.router import NUM_SLOTS, Ring, Topology, slot_of

from ..conftest import Proc


def start_coordinator(procs: list[Proc], tmp_path: Path, *extra: str,
                      data_dir: Path | None = None, port: int = 0) -> Proc:
    d = data_dir or tmp_path / "coordinator"
    p = Proc(["coordinator", "--port", str(port), "--data-dir", str(d), *extra],
             log_path=tmp_path / "coordinator.log")
    procs.append(p)
    return p


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `cond` (an HTTP state has no event to await) until truthy or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def client(p: Proc, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=f"http://{p.addr}", headers=headers, timeout=10.0)


def register(c: httpx.Client, bid: str, port: int, weight: int = 1) -> dict[str, Any]:
    r = c.post("/brokers/register",
               json={"id": bid, "addr": f"127.0.0.1:{port}", "weight": weight})
    assert r.status_code == 200, r.text
    return r.json()


def states(c: httpx.Client) -> dict[str, str]:
    return {b["id"]: b["state"] for b in c.get("/status").json()["brokers"]}


def test_register_heartbeat_topology_and_status(procs: list[Proc], tmp_path: Path) -> None:
    coord = start_coordinator(procs, tmp_path, "--expect", "2")
    with client(coord) as c:
        assert c.get("/healthz").json()["term"] == 1
        assert register(c, "b1", 7101) == {"term": 1, "epoch": 0, "state": "joining",
                                             "heartbeat_ms": 1000}
        assert c.get("/topology").json()["slots"] == []
        assert register(c, "b2", 7102, weight=2) == {"term": 1, "epoch": 1, "state": "active",
                                                       "heartbeat_ms": 1000}

        topo = Topology.from_dict(c.get("/topology").json())
        assert topo.epoch == 1
        assert topo.term == 1
        assert topo.slot_owners == Ring({"b1": 1, "b2": 2}).targets()
        assert topo.addr_of("b2") == "127.0.0.1:7102"

        stats = {"queues": {"emails": {"waiting": 7, "active": 2, "delayed": 1,
                                       "completed": 5, "failed": 0}}}
        r = c.post("/brokers/heartbeat", json={"id": "b2", "stats": stats})
        assert r.json() == {"term": 1, "epoch": 1, "state": "active", "heartbeat_ms": 1000}

        status = c.get("/status").json()
    assert status["epoch"] == 1
    assert [b["id"] for b in status["brokers"]] == ["b1", "b2"]
    b2 = status["brokers"][1]
    assert b2 == {"id": "b2", "addr": "127.0.0.1:7102", "state": "active", "weight": 2,
                  "slots": len(topo.slots_of("b2")), "queues": 1, "waiting": 7, "active": 2,
                  "delayed": 1}
    assert sum(b["slots"] for b in status["brokers"]) == NUM_SLOTS


def test_reregister_with_new_addr_bumps_epoch(procs: list[Proc], tmp_path: Path) -> None:
    coord = start_coordinator(procs, tmp_path)
    with client(coord) as c:
        register(c, "b1", 7101)
        answer = c.post("/brokers/register",
                        json={"id": "b1", "addr": "10.1.2.3:7101", "weight": 1}).json()
        assert answer["epoch"] == 2
        assert c.get("/topology").json()["brokers"]["b1"]["addr"] == "10.1.2.3:7101"


def test_restart_after_kill_keeps_ownership_with_next_term(
        procs: list[Proc], tmp_path: Path) -> None:
    coord = start_coordinator(procs, tmp_path, "--expect", "3")
    with client(coord) as c:
        for i in (1, 2, 3):
            register(c, f"b{i}", 7100 + i)
        before = c.get("/topology").json()
    coord.kill()

    coord2 = start_coordinator(procs, tmp_path, "--expect", "3")

    with client(coord2) as c:
        after = c.get("/topology").json()
        health = c.get("/healthz").json()
        assert set(states(c).values()) == {"active"}
    assert before["term"] == 1
    assert after["term"] == 2
    assert health["term"] == 2
    assert after["epoch"] == before["epoch"] == 1
    assert after["slots"] == before["slots"]
    assert after["brokers"] == before["brokers"]


def test_token_is_required_on_every_request(procs: list[Proc], tmp_path: Path) -> None:
    coord = start_coordinator(procs, tmp_path, "--token", "s3cret")
    with client(coord) as anon, client(coord, "wrong") as wrong, client(coord, "s3cret") as ok:
        for c in (anon, wrong):
            assert c.get("/healthz").status_code == 401
            assert c.get("/topology").status_code == 401
            r = c.post("/brokers/register", json={"id": "b1", "addr": "127.0.0.1:1"})
            assert r.status_code == 401
            assert "token" in r.json()["error"]
        assert ok.get("/healthz").status_code == 200
        assert register(ok, "b1", 7101)["epoch"] == 1


def test_dead_broker_is_forgotten_and_barred(procs: list[Proc], tmp_path: Path) -> None:
    coord = start_coordinator(procs, tmp_path, "--expect", "2", "--heartbeat-timeout-ms", "400")
    with client(coord) as c:
        register(c, "b1", 7101)
        register(c, "b2", 7102)
        lost = Topology.from_dict(c.get("/topology").json()).slots_of("b2")

        def b2_dead() -> bool:
            c.post("/brokers/heartbeat", json={"id": "b1"})
            return states(c) == {"b1": "active", "b2": "dead"}

        wait_until(b2_dead, what="b2 marked dead while b1 heartbeats")
        r = c.post("/brokers/b2/forget", json={})
        assert r.status_code == 400
        assert "accept_data_loss" in r.json()["error"]

        r = c.post("/brokers/b2/forget", json={"accept_data_loss": True})
        assert r.status_code == 200, r.text
        assert r.json()["reassigned"] == {"b1": len(lost)}

        r = c.post("/brokers/register", json={"id": "b2", "addr": "127.0.0.1:7102"})
        assert r.status_code == 403
        assert "forgotten" in r.json()["error"]
        status = c.get("/status").json()
    assert [(b["id"], b["slots"]) for b in status["brokers"]] == [("b1", NUM_SLOTS)]


def test_bad_requests_get_clear_errors(procs: list[Proc], tmp_path: Path) -> None:
    coord = start_coordinator(procs, tmp_path)
    with client(coord) as c:
        register(c, "b1", 7101)
        cases = [
            (c.post("/brokers/register", content=b"{not json"), 400, "JSON"),
            (c.post("/brokers/register", json=[1]), 400, "object"),
            (c.post("/brokers/register", json={"id": "b2"}), 400, "addr"),
            (c.post("/brokers/register", json={"id": "b2", "addr": "x:1", "weight": True}),
             400, "weight"),
            (c.post("/brokers/heartbeat", json={"id": "b9"}), 404, "register"),
            (c.post("/brokers/b9/forget", json={"accept_data_loss": True}), 404, "unknown"),
            (c.post("/brokers/b1/forget", json={"accept_data_loss": True}), 409, "lost"),
        ]
        for r, code, words in cases:
            assert r.status_code == code, r.text
            assert words in r.json()["error"]
        assert c.get("/healthz").json()["ok"] is True


# -- admin CLI against the real coordinator -----------------------------------

runner = CliRunner()


def test_cli_status_and_owner(procs: list[Proc], tmp_path: Path) -> None:
    coord = start_coordinator(procs, tmp_path, "--expect", "2")
    with client(coord) as c:
        register(c, "b1", 7101)
        register(c, "b2", 7102)
        topo = Topology.from_dict(c.get("/topology").json())
    base = ["--coordinator", f"http://{coord.addr}"]

    r = runner.invoke(app, ["status", "--json", *base])
    assert r.exit_code == 0, r.output
    status = json.loads(r.stdout)
    assert status["epoch"] == 1
    assert {b["id"]: b["state"] for b in status["brokers"]} == {"b1": "active", "b2": "active"}

    r = runner.invoke(app, ["status", *base])
    assert r.exit_code == 0, r.output
    assert "b2" in r.stdout
    assert "127.0.0.1:7102" in r.stdout

    for queue in ("emails", "enrich", "webhook:7"):
        r = runner.invoke(app, ["owner", queue, "--json", *base])
        assert r.exit_code == 0, r.output
        owner = topo.owner_of(queue)
        assert json.loads(r.stdout) == {"queue": queue, "slot": slot_of(queue), "broker": owner,
                                        "addr": topo.addr_of(owner or ""), "epoch": 1}


def test_cli_forget_needs_the_flag_and_a_reachable_coordinator(
        procs: list[Proc], tmp_path: Path) -> None:
    coord = start_coordinator(procs, tmp_path, "--token", "t0k")
    base = ["--coordinator", f"http://{coord.addr}"]

    r = runner.invoke(app, ["forget", "b3", *base, "--token", "t0k"])
    assert r.exit_code == 2
    assert "--accept-data-loss" in r.output

    r = runner.invoke(app, ["forget", "b3", "--accept-data-loss", *base, "--token", "t0k"])
    assert r.exit_code == 1
    assert "unknown broker" in r.output

    r = runner.invoke(app, ["status", *base])  # no token
    assert r.exit_code == 1
    assert "401" in r.output

    coord.kill()
    r = runner.invoke(app, ["status", *base], env={"SHARDQ_TOKEN": "t0k"})
    assert r.exit_code == 1
    assert "cannot reach" in r.output


@pytest.mark.parametrize("flag", ["--expect", "--heartbeat-timeout-ms"])
def test_coordinator_refuses_nonsense_options(tmp_path: Path, flag: str) -> None:
    r = runner.invoke(app, ["coordinator", "--port", "0", "--data-dir", str(tmp_path), flag, "0"])
    assert r.exit_code == 2
