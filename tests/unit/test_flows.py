"""Flow state on one queue (broker/flowqueue.py): pending children, parents
waiting for children, the outbox; each survives replay (restart) and an
export -> import -> export round trip (handoff)."""

from __future__ import annotations

from typing import Any

import pytest

from shardq.broker.flowqueue import DUPLICATE, GONE, RECORDED, RESOLVE_GRACE_MS
from shardq.broker.job import COMPLETED, FAILED, PENDING, WAITING, WAITING_CHILDREN
from shardq.broker.queue import QueueDefaults, QueueState, import_chunks

from .test_replay import assert_replay_matches, export, pull_one, single, wire

DEADLINE = 1000


def child(q: QueueState, jid: str, flow: str = "f1", parent: str = "P",
          ignore: bool = False, now: int = 0, **opts: Any) -> None:
    assert q.add(jid, "c", b"\x01", opts or None, now,
                 parent=["qa", parent, flow, DEADLINE, ignore])


def parent(q: QueueState, n: int, jid: str = "P", flow: str = "f1") -> None:
    assert q.add(jid, "p", b"\x02", None, 0, children=[flow, n, {}])


def run(q: QueueState, now: int = 10, ok: bool = True) -> str:
    jid, tok = pull_one(q, now)
    if ok:
        q.ack(jid, tok, b"\xa1" + jid.encode()[:1], now)
    else:
        q.fail(jid, tok, "boom", now)
    return jid


def deliver_all(q: QueueState, now: int = 20) -> list[str]:
    outs = []
    for cid, e in list(q.outbox.items()):
        outs.append(q.flow_child_done(e[1], e[2], e[3], e[4], e[5], e[6], now))
        q.outbox_done(cid)
    return outs


def test_pending_children_are_never_handed_out_until_committed() -> None:
    q, _ = single()
    child(q, "c1")
    child(q, "c2", delay_ms=500)
    out: list[list[Any]] = []
    assert q.pull(10, 100, 1, out) == 0
    assert q.jobs["c1"].state == PENDING and q.counts()["waiting"] == 0
    assert set(q.flows_pending["f1"][3]) == {"c1", "c2"}
    assert q.flow_release("f1", now=5) == 2
    assert q.jobs["c1"].state == WAITING and q.jobs["c2"].state == "delayed"
    assert q.flows_pending == {}
    assert q.flow_release("f1", now=6) == 0  # idempotent


def test_an_aborted_flow_leaves_no_child_behind() -> None:
    q, log = single()
    child(q, "c1")
    child(q, "c2", flow="f2")
    assert q.flow_abort("f1", now=5) == 1
    assert "c1" not in q.jobs and "c2" in q.jobs
    assert q.flows_pending.keys() == {"f2"}
    assert_replay_matches(q, log)


def test_flows_are_due_for_resolution_after_deadline_and_grace() -> None:
    q, _ = single()
    child(q, "c1")
    assert q.flows_due(DEADLINE + RESOLVE_GRACE_MS - 1) == []
    assert q.flows_due(DEADLINE + RESOLVE_GRACE_MS) == [("f1", "qa", "P", DEADLINE)]


def test_the_parents_owner_answers_committed_aborted_or_pending() -> None:
    q, _ = single()
    assert q.flow_status("P", "f1", DEADLINE, now=DEADLINE) == "pending"
    assert q.flow_status("P", "f1", DEADLINE, now=DEADLINE + RESOLVE_GRACE_MS + 1) == "aborted"
    parent(q, 1)
    assert q.flow_status("P", "f1", DEADLINE, now=10**9) == "committed"
    assert q.flow_status("P", "f-other", DEADLINE, now=10**9) == "aborted"


def test_a_parent_runs_once_every_child_is_in_with_their_results() -> None:
    q, log = single()
    parent(q, 2)
    child(q, "c1")
    child(q, "c2")
    q.flow_release("f1", 1)
    out: list[list[Any]] = []
    q.pull(10, 100, 2, out)
    assert [r[1] for r in out] == ["c1", "c2"]  # never the parent
    q.ack("c1", out[0][4], b"r1", 3)
    assert log[-2][0] == "C" and log[-1][0] == "cO"  # same batch as the completion
    assert q.outbox["c1"][:6] == ["qa", "P", "f1", "qa:c1", True, b"r1"]
    assert deliver_all(q) == [RECORDED]
    assert q.jobs["P"].state == WAITING_CHILDREN
    q.ack("c2", out[1][4], b"r2", 4)
    assert deliver_all(q) == [RECORDED]
    assert q.jobs["P"].state == WAITING and q.jobs["P"].children[2] == {
        "qa:c1": b"r1", "qa:c2": b"r2"}
    assert q.outbox == {}
    assert run(q, now=30) == "P"
    assert q.jobs["P"].state == COMPLETED
    assert_replay_matches(q, log)


def test_a_delivery_is_idempotent_by_child_key() -> None:
    q, log = single()
    parent(q, 2)
    assert q.flow_child_done("P", "f1", "qa:c1", True, b"r", False, 1) == RECORDED
    assert q.flow_child_done("P", "f1", "qa:c1", True, b"other", False, 2) == DUPLICATE
    assert q.jobs["P"].children[2] == {"qa:c1": b"r"}
    assert q.flow_child_done("P", "f-other", "qa:c2", True, b"r", False, 3) == GONE
    assert q.flow_child_done("nope", "f1", "qa:c2", True, b"r", False, 3) == GONE
    assert_replay_matches(q, log)


def test_a_child_failing_for_good_fails_the_parent_naming_the_child() -> None:
    q, log = single()
    parent(q, 2)
    child(q, "c1", attempts=1)
    child(q, "c2")
    q.flow_release("f1", 1)
    run(q, ok=False)
    assert q.outbox["c1"][4:6] == [False, "boom"]
    deliver_all(q)
    p = q.jobs["P"]
    assert p.state == FAILED and p.failed_reason == "child qa:c1 failed: boom"
    run(q, ok=True)  # the other child still completes; its delivery changes nothing
    assert deliver_all(q) == [DUPLICATE]
    assert_replay_matches(q, log)


def test_ignore_failure_counts_a_failed_child_as_done_with_none() -> None:
    q, log = single()
    parent(q, 1)
    child(q, "c1", ignore=True)
    q.flow_release("f1", 1)
    run(q, ok=False)
    deliver_all(q)
    assert q.jobs["P"].state == WAITING and q.jobs["P"].children[2] == {"qa:c1": None}
    assert_replay_matches(q, log)


def test_a_partitions_children_are_keyed_by_the_queue_name() -> None:
    log: list[Any] = []
    q = QueueState("pages~3", 5, log, QueueDefaults())
    assert q.add("c1", "c", b"", None, 0, parent=["qa", "P", "f1", DEADLINE, False])
    q.flow_release("f1", 1)
    run(q)
    assert q.outbox["c1"][3] == "pages:c1"


def test_a_removed_child_keeps_its_outbox_entry() -> None:
    q, log = single()
    child(q, "c1", remove_on_complete=0)  # validated opts: 0 = at once
    q.flow_release("f1", 1)
    run(q)
    assert "c1" not in q.jobs and "c1" in q.outbox
    assert_replay_matches(q, log)


def test_obliterate_drops_the_outbox_and_pending_children() -> None:
    q, log = single()
    child(q, "c1")
    child(q, "c2", flow="f2")
    q.flow_release("f2", 1)
    run(q)
    q.obliterate()
    assert q.outbox == {} and q.flows_pending == {}
    assert_replay_matches(q, log)


FLOW_STATE = {
    "pending": lambda q: child(q, "c9"),
    "waiting_children": lambda q: parent(q, 3),
    "outbox": lambda q: (child(q, "c9"), q.flow_release("f1", 1), run(q)),
    "partly_done": lambda q: (parent(q, 3), q.flow_child_done("P", "f1", "x:1", True, b"r",
                                                               False, 1)),
}


@pytest.mark.parametrize("state", FLOW_STATE)
def test_flow_state_survives_replay_and_an_export_import_round_trip(state: str) -> None:
    q, log = single()
    q.add("a", "n", b"", None, 0)
    FLOW_STATE[state](q)
    assert_replay_matches(q, log)
    chunks = wire(list(q.export_chunks(chunk_size=2)))
    q2 = import_chunks(chunks, [], q.defaults)
    assert export(q2) == export(q)
    assert sorted(q2.flows_pending) == sorted(q.flows_pending)
    assert q2.outbox == q.outbox
