"""The broker half of a handoff, driven step by step over the wire as the
coordinator would (docs/design.md §6): copy while serving, durable freeze, catch-up,
activate, release; and abort."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest

from shardq.codec import encode_frame
from shardq.router import Topology, slot_of
from tests.conftest import Proc, queue_on
from tests.integration.rawwire import RawConn, add_args


def wait_for(cond: Any, what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def pair(procs: list[Proc], tmp_path: Path, start_broker):  # type: ignore[no-untyped-def]
    coord = Proc(["coordinator", "--port", "0", "--data-dir", str(tmp_path / "coord"),
                  "--expect", "2"], log_path=tmp_path / "coord.log")
    procs.append(coord)
    url = f"http://{coord.addr}"
    b1 = start_broker("b1", "--coordinator", url)
    b2 = start_broker("b2", "--coordinator", url)

    def topo() -> Topology | None:
        t = Topology.from_dict(httpx.get(f"{url}/topology").json())
        return t if t.epoch >= 1 and all(
            RawConn(b.addr).ok("STATS", {})["slots"] > 0 for b in (b1, b2)) else None

    t = wait_for(topo, "bootstrap")
    term = httpx.get(f"{url}/healthz").json()["term"]
    return b1, b2, t, term



def prepare_move(b1: Proc, b: RawConn, slots: list[int], term: int) -> dict[str, Any]:
    """A new move of `slots` from b1 to the broker behind `b`, prepared there."""
    move = {"move_id": str(uuid.uuid4()), "slots": slots, "term": term}
    b.ok("HANDOFF_PREPARE", {**move, "source": "b1", "source_addr": b1.addr})
    return move



def test_a_slot_moves_with_its_jobs_locks_and_writes_made_during_the_copy(pair) -> None:  # type: ignore[no-untyped-def]
    b1, b2, t, term = pair
    q = queue_on(t, "b1", "hq")
    slot = slot_of(q)
    a, b = RawConn(b1.addr), RawConn(b2.addr)
    a.ok("ADD", add_args(q, *[f"j{i}" for i in range(3000)]))
    active = a.ok("PULL", {"queues": [q], "count": 5, "lock_ms": 60_000})
    before = a.ok("COUNTS", {"queue": q})
    mid = str(uuid.uuid4())
    move = {"move_id": mid, "slots": [slot], "term": term}
    assert b.ok("HANDOFF_PREPARE", {**move, "source": "b1", "source_addr": b1.addr}) == {
        "state": "importing"}
    assert b.call("ADD", add_args(q, "x"))[1] == "MOVED"  # B does not serve it yet
    copied = a.ok("HANDOFF_COPY", {**move, "target": "b2", "target_addr": b2.addr})
    assert copied["jobs"] == 3000
    # Writes after the snapshot still reach B through the catch-up.
    a.ok("ADD", add_args(q, "late-1", "late-2"))
    a.ok("ACK", {"items": [[q, active[0][1], active[0][4], msgpack.packb("done")]]})
    assert a.ok("HANDOFF_FREEZE", move) == {"frozen": True}
    frozen = a.call("ADD", add_args(q, "during-freeze"))
    assert frozen[1] == "TRYAGAIN"
    other = queue_on(t, "b1", "other")
    if slot_of(other) != slot:  # only the moving slot pauses (guarantee 3)
        assert a.ok("ADD", add_args(other, "fine")) == ["fine"]
    assert a.ok("HANDOFF_CATCHUP", move)["ops"] >= 3
    epoch = t.epoch + 1
    assert b.ok("HANDOFF_ACTIVATE", {**move, "epoch": epoch}) == {"active": True}
    assert a.ok("HANDOFF_RELEASE", {**move, "epoch": epoch, "owner": "b2",
                                    "addr": b2.addr}) == {"released": True}
    moved = a.call("ADD", add_args(q, "after"))
    assert moved[1] == "MOVED" and moved[2]["owner"] == "b2" and moved[2]["addr"] == b2.addr
    after = b.ok("COUNTS", {"queue": q})
    assert after["waiting"] == before["waiting"] + 2
    assert after["active"] == before["active"] - 1 and after["completed"] == 1
    assert b.ok("GET_JOB", {"queue": q, "id": active[0][1]})["state"] == "completed"
    # A worker's lock on a moved active job stays valid at B.
    assert b.ok("ACK", {"items": [[q, active[1][1], active[1][4], None]]}) == [None]
    assert b.ok("HANDOFF_STATUS", {"move_id": mid}) == "committed"
    assert b.ok("HANDOFF_STATUS", {"move_id": mid, "detail": True}) == {
        "state": "committed", "epoch": epoch}  # the commit's epoch, not a guess
    for c in (a, b):
        c.close()


def test_an_aborted_move_leaves_the_source_owner_and_the_target_clean(pair) -> None:  # type: ignore[no-untyped-def]
    b1, b2, t, term = pair
    q = queue_on(t, "b1", "ab")
    slot = slot_of(q)
    a, b = RawConn(b1.addr), RawConn(b2.addr)
    a.ok("ADD", add_args(q, *[f"j{i}" for i in range(100)]))
    move = prepare_move(b1, b, [slot], term)
    a.ok("HANDOFF_COPY", {**move, "target": "b2", "target_addr": b2.addr})
    a.ok("HANDOFF_FREEZE", move)
    a.ok("HANDOFF_ABORT", move)
    b.ok("HANDOFF_ABORT", move)
    assert a.ok("ADD", add_args(q, "after-abort")) == ["after-abort"]
    assert a.ok("COUNTS", {"queue": q})["waiting"] == 101
    assert b.call("HANDOFF_ACTIVATE", {**move, "epoch": t.epoch + 1})[1] == "BAD_REQUEST"
    assert b.ok("HANDOFF_STATUS", {"move_id": move["move_id"]}) == "aborted"
    assert b.ok("HANDOFF_STATUS", {"move_id": "never-heard-of"}) == "aborted"
    assert a.call("HANDOFF_FREEZE", {**move, "term": term - 1})[1] == "STALE_TERM"
    # Final states have no way out: a late copy or freeze of the aborted move is refused.
    late = a.call("HANDOFF_COPY", {**move, "target": "b2", "target_addr": b2.addr})
    assert late[1] == "BAD_REQUEST" and "aborted here" in late[2]
    assert a.call("HANDOFF_FREEZE", move)[1] == "BAD_REQUEST"
    assert a.ok("ADD", add_args(q, "still-served")) == ["still-served"]
    for c in (a, b):
        c.close()


def test_a_freeze_survives_a_kill_and_activation_survives_a_kill(
        pair, start_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    b1, b2, t, term = pair
    q = queue_on(t, "b1", "kk")
    slot = slot_of(q)
    a, b = RawConn(b1.addr), RawConn(b2.addr)
    a.ok("ADD", add_args(q, *[f"j{i}" for i in range(500)]))
    move = prepare_move(b1, b, [slot], term)
    a.ok("HANDOFF_COPY", {**move, "target": "b2", "target_addr": b2.addr})
    a.ok("HANDOFF_FREEZE", move)
    a.ok("HANDOFF_CATCHUP", move)
    a.close()
    b.close()
    b1.kill()
    b2.kill()
    url = b1.args[b1.args.index("--coordinator") + 1]
    b1 = start_broker("b1", "--coordinator", url, data_dir=tmp_path / "b1-data")
    b2 = start_broker("b2", "--coordinator", url, data_dir=tmp_path / "b2-data")
    a, b = RawConn(b1.addr), RawConn(b2.addr)
    assert a.call("ADD", add_args(q, "x"))[1] == "TRYAGAIN"  # still frozen after restart
    epoch = t.epoch + 1
    b.ok("HANDOFF_ACTIVATE", {**move, "epoch": epoch})
    b2.kill()
    b2 = start_broker("b2", "--coordinator", url, data_dir=tmp_path / "b2-data")
    b = RawConn(b2.addr)
    assert b.ok("COUNTS", {"queue": q})["waiting"] == 500  # staged data became live, durably
    a.ok("HANDOFF_RELEASE", {**move, "epoch": epoch, "owner": "b2", "addr": b2.addr})
    assert a.call("ADD", add_args(q, "y"))[1] == "MOVED"
    for c in (a, b):
        c.close()


@pytest.mark.parametrize("outcome", ["committed", "aborted"])
def test_a_frozen_source_cut_off_from_the_coordinator_asks_the_target(
        pair, outcome: str) -> None:  # type: ignore[no-untyped-def]
    b1, b2, t, term = pair
    q = queue_on(t, "b1", f"ask-{outcome}")
    slot = slot_of(q)
    a, b = RawConn(b1.addr), RawConn(b2.addr)
    a.ok("ADD", add_args(q, "j1", "j2"))
    move = prepare_move(b1, b, [slot], term)
    a.ok("HANDOFF_COPY", {**move, "target": "b2", "target_addr": b2.addr})
    a.ok("HANDOFF_FREEZE", move)
    a.ok("HANDOFF_CATCHUP", move)
    # The coordinator "disappears": it committed (target activated) or aborted
    # (target dropped staging), and never tells the source.
    if outcome == "committed":
        b.ok("HANDOFF_ACTIVATE", {**move, "epoch": t.epoch + 1})
    else:
        b.ok("HANDOFF_ABORT", move)
    expected = "MOVED" if outcome == "committed" else "ok"
    wait_for(lambda: a.call("ADD", add_args(q, "probe"))[1] == expected,
             f"the source to learn the move was {outcome}", timeout=20)
    if outcome == "committed":
        assert b.ok("COUNTS", {"queue": q})["waiting"] == 2
    for c in (a, b):
        c.close()


def test_an_ack_and_fetch_naming_a_frozen_queue_still_answers_its_acks(pair) -> None:  # type: ignore[no-untyped-def]
    b1, b2, t, term = pair
    q, frozen_q = queue_on(t, "b1", "af"), queue_on(t, "b1", "fz")
    a, b = RawConn(b1.addr), RawConn(b2.addr)
    a.ok("ADD", add_args(q, "j1", "j2"))
    jobs = a.ok("PULL", {"queues": [q], "count": 1})
    move = prepare_move(b1, b, [slot_of(frozen_q)], term)
    a.ok("HANDOFF_COPY", {**move, "target": "b2", "target_addr": b2.addr})
    a.ok("HANDOFF_FREEZE", move)
    reply = a.ok("ACK", {"items": [[q, jobs[0][1], jobs[0][4], None]],
                         "pull": {"queues": [frozen_q, q], "count": 5}})
    assert reply["acks"] == [None]  # the ack counted, though one pull queue is frozen
    assert [j[1] for j in reply["jobs"]] == ["j2"]
    a.ok("HANDOFF_ABORT", move)
    b.ok("HANDOFF_ABORT", move)
    for c in (a, b):
        c.close()


def test_imported_jobs_reach_the_checkpoint_of_the_target(
        pair, start_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    b1, b2, t, term = pair
    q = queue_on(t, "b1", "ck")
    a, b = RawConn(b1.addr), RawConn(b2.addr)
    a.ok("ADD", add_args(q, *[f"j{i}" for i in range(300)]))
    move = prepare_move(b1, b, [slot_of(q)], term)
    a.ok("HANDOFF_COPY", {**move, "target": "b2", "target_addr": b2.addr})
    a.ok("HANDOFF_FREEZE", move)
    a.ok("HANDOFF_CATCHUP", move)
    b.ok("HANDOFF_ACTIVATE", {**move, "epoch": t.epoch + 1})
    b.close()
    # SIGTERM checkpoints everything and deletes the log rows it covers: the
    # imported jobs must be in that checkpoint, not only in the deleted log.
    assert b2.terminate() == 0
    url = b2.args[b2.args.index("--coordinator") + 1]
    b2 = start_broker("b2", "--coordinator", url, data_dir=tmp_path / "b2-data")
    b = RawConn(b2.addr)
    assert b.ok("COUNTS", {"queue": q})["waiting"] == 300
    for c in (a, b):
        c.close()


def test_a_target_with_a_staged_import_stops_at_once_on_sigterm_and_keeps_it(
        pair, start_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Its coordinator gone mid-move, the target still holds the staged copy;
    # SIGTERM must not wait for a checkpoint that cannot start while it does.
    b1, b2, t, term = pair
    q = queue_on(t, "b1", "st")
    a, b = RawConn(b1.addr), RawConn(b2.addr)
    a.ok("ADD", add_args(q, *[f"j{i}" for i in range(50)]))
    move = prepare_move(b1, b, [slot_of(q)], term)
    a.ok("HANDOFF_COPY", {**move, "target": "b2", "target_addr": b2.addr})
    b.close()
    assert b2.terminate(timeout=10) == 0
    url = b2.args[b2.args.index("--coordinator") + 1]
    b2 = start_broker("b2", "--coordinator", url, data_dir=tmp_path / "b2-data")
    b = RawConn(b2.addr)
    assert b.ok("HANDOFF_STATUS", move) == "pending"  # the import survived the restart
    a.ok("HANDOFF_FREEZE", move)
    a.ok("HANDOFF_CATCHUP", {**move, "target_addr": b2.addr})
    b.ok("HANDOFF_ACTIVATE", {**move, "epoch": t.epoch + 1})
    assert b.ok("COUNTS", {"queue": q})["waiting"] == 50
    for c in (a, b):
        c.close()


def test_a_pull_parked_on_a_queue_that_moves_away_is_answered_at_once(
        pair) -> None:  # type: ignore[no-untyped-def]
    # Otherwise the worker's slots stay reserved by a long poll on a broker
    # that no longer serves the queue, for up to wait_ms.
    b1, b2, t, term = pair
    q = queue_on(t, "b1", "pk")
    a, b, poller = RawConn(b1.addr), RawConn(b2.addr), RawConn(b1.addr, timeout=3.0)
    poller.send_raw(encode_frame([99, "PULL", {"queues": [q], "count": 5, "wait_ms": 30_000,
                                               "lock_ms": 10_000}]))
    a.ok("PING", {})  # the pull is parked by now (one connection's frames run in order)
    move = prepare_move(b1, b, [slot_of(q)], term)
    a.ok("HANDOFF_COPY", {**move, "target": "b2", "target_addr": b2.addr})
    a.ok("HANDOFF_FREEZE", move)
    a.ok("HANDOFF_CATCHUP", move)
    b.ok("HANDOFF_ACTIVATE", {**move, "epoch": t.epoch + 1})
    a.ok("HANDOFF_RELEASE", {**move, "epoch": t.epoch + 1, "owner": "b2", "addr": b2.addr})
    req_id, status, body, epoch = poller.recv_frame()  # within the 3 s socket timeout
    assert (req_id, status, body) == (99, "ok", [])
    assert epoch >= t.epoch + 1  # newer than the worker's map: it refreshes
    for c in (a, b, poller):
        c.close()
