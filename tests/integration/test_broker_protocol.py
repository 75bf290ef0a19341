"""A real broker process at the wire level: locks, stalls, pause, bad input."""

from __future__ import annotations

import msgpack
import pytest

from tests.integration.rawwire import RawConn, add_args, length_prefix


@pytest.fixture
def broker(start_broker):  # type: ignore[no-untyped-def]
    return start_broker("b1")


def test_stalled_job_is_redelivered_and_its_late_ack_is_refused(broker) -> None:  # type: ignore[no-untyped-def]
    c = RawConn(broker.addr)
    c.ok("ADD", add_args("stall", "j1"))
    [first] = c.ok("PULL", {"queues": ["stall"], "count": 1, "lock_ms": 150})
    old_token = first[4]
    # The worker "dies": no ack, no extension. A long poll gets the redelivery
    # as soon as the lock runs out.
    [again] = c.ok("PULL", {"queues": ["stall"], "count": 1, "wait_ms": 5000, "lock_ms": 30000})
    assert again[1] == "j1" and again[4] != old_token
    assert again[6] == 2  # attempts_started
    [late] = c.ok("ACK", {"items": [["stall", "j1", old_token, None]]})
    assert late[0] == "LOCK_LOST"
    assert c.ok("ACK", {"items": [["stall", "j1", again[4], None]]}) == [None]
    job = c.ok("GET_JOB", {"queue": "stall", "id": "j1"})
    assert job["state"] == "completed" and job["stalled_count"] == 1
    assert job["attempts_started"] == 2 and job["attempts_made"] == 1


def test_a_job_that_stalls_past_max_stalled_count_fails(broker) -> None:  # type: ignore[no-untyped-def]
    c = RawConn(broker.addr)
    c.ok("ADD", add_args("stall2", "j1"))
    c.ok("PULL", {"queues": ["stall2"], "count": 1, "lock_ms": 100})
    c.ok("PULL", {"queues": ["stall2"], "count": 1, "wait_ms": 5000, "lock_ms": 100})
    # Second stall exceeds max_stalled_count (1): no third delivery.
    assert c.ok("PULL", {"queues": ["stall2"], "count": 1, "wait_ms": 600, "lock_ms": 100}) == []
    job = c.ok("GET_JOB", {"queue": "stall2", "id": "j1"})
    assert job["state"] == "failed" and "stalled" in job["failed_reason"]


def test_a_paused_queue_delivers_nothing_until_resumed(broker) -> None:  # type: ignore[no-untyped-def]
    c = RawConn(broker.addr)
    c.ok("PAUSE", {"queue": "p"})
    c.ok("ADD", add_args("p", "a", "b"))
    assert c.ok("PULL", {"queues": ["p"], "count": 10, "wait_ms": 300}) == []
    assert c.ok("COUNTS", {"queue": "p"})["paused"] is True
    other = RawConn(broker.addr)
    other.ok("RESUME", {"queue": "p"})
    got = c.ok("PULL", {"queues": ["p"], "count": 10, "wait_ms": 3000})
    assert sorted(j[1] for j in got) == ["a", "b"]


def test_a_parked_pull_is_woken_by_an_add(broker) -> None:  # type: ignore[no-untyped-def]
    waiter = RawConn(broker.addr)
    producer = RawConn(broker.addr)
    waiter.rid += 1
    from shardq.codec import encode_frame

    waiter.send_raw(encode_frame([waiter.rid, "PULL", {"queues": ["lp"], "count": 5,
                                                        "wait_ms": 10000}]))
    producer.ok("ADD", add_args("lp", "x"))
    reply = waiter.recv_frame()
    assert reply[1] == "ok" and [j[1] for j in reply[2]] == ["x"]


def test_priority_then_fifo_order(broker) -> None:  # type: ignore[no-untyped-def]
    c = RawConn(broker.addr)
    c.ok("ADD", add_args("prio", "low1", opts={"priority": 5}))
    c.ok("ADD", add_args("prio", "high1", "high2", opts={"priority": 0}))
    c.ok("ADD", add_args("prio", "low2", opts={"priority": 5}))
    got = c.ok("PULL", {"queues": ["prio"], "count": 10})
    assert [j[1] for j in got] == ["high1", "high2", "low1", "low2"]


GARBAGE = [
    b"\x00\x00\x00\x03\xc1\xc1\xc1",                       # delimited, not msgpack
    b"\x00\x00\x00\x05" + msgpack.packb("just"),           # a string, not a request
    b"\x00\x00\x00\x01\x90",                               # [] : not a request
]


def bad_requests() -> list[object]:
    return [
        [1, "ADD", "not-a-map"],
        [2, "ADD", {"queue": 7, "jobs": []}],
        [3, "ADD", {"queue": "q", "jobs": [["id", "n", "str-not-bytes", None]]}],
        [4, "ADD", {"queue": "q", "jobs": [["id", "n", b"x", {"priority": -1}]]}],
        [5, "NOPE", {}],
        ["x", "PING", {}],
        [6, "PULL", {"queues": []}],
        [7, "ACK", {"items": [["q", 1, 2]]}],
        [8, "HELLO", {"version": 99}],
        [9, "ADD", {"queue": "", "jobs": []}],
        [10, "ADD", {"queue": "q" * 10_000, "jobs": []}],
    ]


def test_garbage_on_one_connection_leaves_another_connections_work_intact(
        broker) -> None:  # type: ignore[no-untyped-def]
    from shardq.codec import encode_frame

    good = RawConn(broker.addr)
    good.ok("ADD", add_args("work", *[f"j{i}" for i in range(50)]))
    bad = RawConn(broker.addr)
    for blob in GARBAGE:
        bad.send_raw(blob)
    codes = []
    for req in bad_requests():
        bad.send_raw(encode_frame(req))
    # Every malformed request gets a typed error on its own connection.
    while len(codes) < len(bad_requests()) + len(GARBAGE):
        f = bad.recv_frame()
        if f[1] == "ok":  # a bulk op answers per item
            assert all(item[0] == "BAD_REQUEST" for item in f[2]), f
            codes.append("BAD_REQUEST")
        else:
            codes.append(f[1])
    assert set(codes) == {"BAD_REQUEST"}, codes
    # Unframed bytes desynchronise a stream; that costs only that connection.
    junk = RawConn(broker.addr)
    junk.send_raw(b"\xffGET / HTTP/1.1\r\n\r\n")
    assert junk.recv_frame()[1] == "TOO_LARGE"
    # An oversized length prefix closes only that connection.
    huge = RawConn(broker.addr)
    huge.send_raw(length_prefix(2**31))
    assert huge.recv_frame()[1] == "TOO_LARGE"
    # The well-behaved connection carries on as if nothing happened.
    jobs = good.ok("PULL", {"queues": ["work"], "count": 100})
    assert len(jobs) == 50
    assert good.ok("ACK", {"items": [[j[0], j[1], j[4], None] for j in jobs]}) == [None] * 50
    assert good.ok("COUNTS", {"queue": "work"})["completed"] == 50
    assert broker.alive()
    for conn in (good, bad, huge, junk):
        conn.close()


def test_job_data_over_the_limit_is_refused_per_item(start_broker) -> None:  # type: ignore[no-untyped-def]
    b = start_broker("b1", "--max-job-data", "100")
    c = RawConn(b.addr)
    res = c.ok("ADD", {"queue": "q", "jobs": [["small", "n", b"x" * 10, None],
                                              ["big", "n", b"x" * 500, None]]})
    assert res[0] == "small" and res[1][0] == "TOO_LARGE"
    assert c.ok("COUNTS", {"queue": "q"})["waiting"] == 1


def test_adds_over_max_jobs_get_busy(start_broker) -> None:  # type: ignore[no-untyped-def]
    b = start_broker("b1", "--max-jobs", "10")
    c = RawConn(b.addr)
    c.ok("ADD", add_args("q", *[f"a{i}" for i in range(10)]))
    reply = c.call("ADD", add_args("q", "one-more"))
    assert reply[1] == "BUSY" and reply[2]["retry_after_ms"] > 0
    # Working jobs off frees room again.
    jobs = c.ok("PULL", {"queues": ["q"], "count": 10})
    c.ok("ACK", {"items": [[j[0], j[1], j[4], None] for j in jobs]})
    # completed jobs are retained but no longer count as live work
    assert c.ok("COUNTS", {"queue": "q"})["completed"] == 10


def test_wrong_token_is_refused_and_nothing_else_is_served(start_broker) -> None:  # type: ignore[no-untyped-def]
    b = start_broker("b1", "--token", "s3cret")
    c = RawConn(b.addr, hello=False)
    assert c.call("PING", {})[1] == "AUTH"
    assert c.call("HELLO", {"version": 1, "token": "wrong"})[1] == "AUTH"
    assert c.call("ADD", add_args("q", "x"))[1] == "AUTH"
    assert c.call("HELLO", {"version": 1, "token": "s3cret"})[1] == "ok"
    assert c.ok("ADD", add_args("q", "x")) == ["x"]
