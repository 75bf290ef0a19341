"""A failed attempt's stack trace on the job (`job.stacktrace`, broker/job.py):
bounded per attempt and in attempts kept, logged as a `jU` op, and absent
from records stored before the field existed. Plain Python, no sockets."""

from __future__ import annotations

from typing import Any

from shardq.broker.job import FIELDS, STACKTRACE_LIMIT, STACKTRACE_MAX, Job
from shardq.broker.queue import QueueDefaults, QueueState
from shardq.client.worker import failure_stacktrace


def failing(q: QueueState, jid: str, now: int, stack: str) -> None:
    out: list[list[Any]] = []
    q.promote(now)
    assert q.pull(1, 1000, now, out) == 1
    assert q.fail(jid, out[0][4], "boom", now) is None
    q.note_stacktrace(jid, stack)


def test_the_last_attempts_stack_traces_are_kept_each_cut_to_its_tail() -> None:
    log: list[Any] = []
    q = QueueState("q", 1, log, QueueDefaults())
    attempts = STACKTRACE_LIMIT + 2
    q.add("j", "n", b"", {"attempts": attempts}, now=0)
    for i in range(attempts):
        failing(q, "j", now=10 * (i + 1), stack="x" * STACKTRACE_MAX + f"attempt {i}")
    job = q.jobs["j"]
    assert job.state == "failed"
    assert job.stacktrace is not None and len(job.stacktrace) == STACKTRACE_LIMIT
    assert [s[-9:] for s in job.stacktrace] == [
        f"attempt {i}" for i in range(attempts - STACKTRACE_LIMIT, attempts)]
    assert all(len(s) == STACKTRACE_MAX for s in job.stacktrace)
    assert job.to_public()["stacktrace"] == job.stacktrace
    assert log[-1] == ("jU", "q", "j", {"stacktrace": job.stacktrace})


def test_a_job_removed_by_its_failure_keeps_no_stack_trace_and_logs_none() -> None:
    log: list[Any] = []
    q = QueueState("q", 1, log, QueueDefaults())
    q.add("j", "n", b"", {"remove_on_fail": 0}, now=0)
    failing(q, "j", now=5, stack="Traceback ...")
    assert "j" not in q.jobs
    assert not any(op[0] == "jU" for op in log)


def test_a_record_stored_before_the_field_loads_with_no_stack_trace() -> None:
    job = Job("j", "n", b"", "failed", 0, 1, None, 0, failed_reason="boom")
    old = job.to_record()[:-1]  # the record as written before `stacktrace`
    assert len(old) == len(FIELDS) - 1
    loaded = Job.from_record(old)
    assert loaded.stacktrace is None
    assert loaded.to_public()["stacktrace"] == []


def test_the_worker_sends_the_formatted_traceback_with_the_raising_frame() -> None:
    def deep_inside() -> None:
        raise ValueError("bad input 7")

    try:
        deep_inside()
    except ValueError as exc:
        text = failure_stacktrace(exc)
    assert text.startswith("Traceback (most recent call last):")
    assert "in deep_inside" in text and text.endswith("ValueError: bad input 7\n")
    huge = ValueError("y" * 3 * STACKTRACE_MAX)
    assert len(failure_stacktrace(huge)) == STACKTRACE_MAX
