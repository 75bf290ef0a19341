"""A resent ACK/FAIL whose first copy was applied answers ok (docs/design.md §2)."""

from __future__ import annotations

from tests.integration.rawwire import RawConn, add_args


def _pull_one(c: RawConn, queue: str, lock_ms: int = 30_000) -> list:  # type: ignore[type-arg]
    (job,) = c.ok("PULL", {"queues": [queue], "count": 1, "lock_ms": lock_ms})
    return job  # type: ignore[no-any-return]


def test_a_repeated_ack_answers_ok_and_changes_nothing(start_broker) -> None:  # type: ignore[no-untyped-def]
    b = start_broker("b1")
    c = RawConn(b.addr)
    c.ok("ADD", add_args("q", "j1", "j2"))
    job = _pull_one(c, "q")
    item = [job[0], job[1], job[4], b"\x01"]
    assert c.ok("ACK", {"items": [item]}) == [None]
    # The resend after a timeout: same token, same answer, nothing changes.
    assert c.ok("ACK", {"items": [item]}) == [None]
    assert c.ok("FAIL", {"items": [[job[0], job[1], job[4], "late"]]}) == [None]
    got = c.ok("GET_JOB", {"queue": "q", "id": job[1]})
    assert got["state"] == "completed" and got["attempts_made"] == 1
    assert c.ok("COUNTS", {"queue": "q"})["completed"] == 1
    # Another token for the same job is still refused.
    assert c.ok("ACK", {"items": [[job[0], job[1], job[4] ^ 1, None]]})[0][0] == "LOCK_LOST"


def test_a_repeated_fail_that_retried_the_job_answers_ok_once(start_broker) -> None:  # type: ignore[no-untyped-def]
    b = start_broker("b1")
    c = RawConn(b.addr)
    c.ok("ADD", add_args("q", "j1", opts={"attempts": 3}))
    job = _pull_one(c, "q")
    fail = {"items": [[job[0], job[1], job[4], "boom"]]}
    assert c.ok("FAIL", fail) == [None]
    assert c.ok("FAIL", fail) == [None]
    got = c.ok("GET_JOB", {"queue": "q", "id": "j1"})
    assert got["state"] == "waiting" and got["attempts_made"] == 1  # one failure counted


def test_an_ack_after_the_lock_expired_is_still_lock_lost(start_broker) -> None:  # type: ignore[no-untyped-def]
    b = start_broker("b1")
    c = RawConn(b.addr)
    c.ok("ADD", add_args("q", "j1", opts={"attempts": 2}))
    job = _pull_one(c, "q", lock_ms=1)
    # Redelivered after the stall (the lock ran out; the token was revoked).
    for _ in range(500):
        again = c.ok("PULL", {"queues": ["q"], "count": 1, "wait_ms": 50})
        if again:
            break
    assert again and again[0][4] != job[4]
    assert c.ok("ACK", {"items": [[job[0], job[1], job[4], None]]})[0][0] == "LOCK_LOST"
