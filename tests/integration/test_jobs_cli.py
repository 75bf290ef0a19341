"""The operator commands on jobs (shardq/cli/jobs_cmd.py) through typer's
CliRunner against a real broker: listing fits 80 columns with whole
headers, `job` shows one job, `retry` / `clean` / `pause` / `resume` act
and say how many, and bad input exits non-zero with a clear message."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import shardq
from shardq.cli import app
from shardq.cli.jobs_cmd import parse_duration
from tests.aio import run, running, until

HEADERS = ("id", "state", "name", "tries", "time (UTC)", "reason")


@pytest.fixture
def broker(start_broker):  # type: ignore[no-untyped-def]
    return start_broker("b1")


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "80"})
    return result.exit_code, result.output


async def failing_jobs(addr: str, n: int) -> None:
    async with await shardq.connect(addr) as client:
        q = client.queue("ops")
        for i in range(n):
            await q.add("send-email", {"i": i}, job_id=f"job-{i:04d}-" + "x" * 30)

        async def handle(job: shardq.Job) -> None:
            raise RuntimeError("smtp said no, and a very long explanation follows " * 3)

        async with running(client.worker("ops", handle, concurrency=4)):
            await until(lambda: _failed(q, n), f"{n} failures")
        await q.add("ok", {}, job_id="waiting-one")


async def _failed(q: shardq.Queue, n: int) -> bool:
    return (await q.get_job_counts("failed"))["failed"] == n


def test_jobs_job_retry_clean_pause_resume(broker) -> None:  # type: ignore[no-untyped-def]
    run(failing_jobs(broker.addr, 3))
    code, out = cli("jobs", "ops", "--state", "failed", "--coordinator", broker.addr)
    assert code == 0, out
    assert max(len(line) for line in out.splitlines()) <= 80, out
    header = next(line for line in out.splitlines() if "state" in line)
    assert all(h in header for h in HEADERS), header  # none cut to "sta…"
    assert out.count("failed") >= 3 and "job-0000" in out and "smtp said no" in out
    assert "all time: 0 completed, 3 failed" in out

    code, out = cli("jobs", "ops", "--json", "--coordinator", broker.addr)
    body = json.loads(out)
    assert {j["id"][:8] for j in body["jobs"]} == {"job-0000", "job-0001", "job-0002",
                                                   "waiting-"}
    assert body["counts"]["failed"] == 3

    jid = "job-0001-" + "x" * 30
    code, out = cli("job", "ops", jid, "--coordinator", broker.addr)
    assert code == 0 and "failed_reason" in out and "smtp said no" in out, out
    code, out = cli("job", "ops", "nope", "--coordinator", broker.addr)
    assert code == 1 and "no job 'nope'" in out

    code, out = cli("retry", "ops", jid, "--coordinator", broker.addr)
    assert (code, out.strip()) == (0, "retried 1 job(s) in ops")
    code, out = cli("retry", "ops", "waiting-one", "--coordinator", broker.addr)
    assert code == 1 and "JobStateError" in out and "waiting" in out, out
    code, out = cli("retry", "ops", "--all-failed", "--coordinator", broker.addr)
    assert (code, out.strip()) == (0, "retried 2 job(s) in ops")
    code, out = cli("retry", "ops", "--coordinator", broker.addr)
    assert code != 0 and "--all-failed" in out

    code, out = cli("pause", "ops", "--coordinator", broker.addr)
    assert (code, out.strip()) == (0, "paused ops")
    code, out = cli("clean", "ops", "--state", "waiting", "--grace", "1h",
                    "--coordinator", broker.addr)
    assert (code, out.strip()) == (0, "removed 0 waiting job(s) from ops")  # all younger
    code, out = cli("clean", "ops", "--state", "waiting", "--coordinator", broker.addr)
    assert (code, out.strip()) == (0, "removed 4 waiting job(s) from ops")
    code, out = cli("resume", "ops", "--coordinator", broker.addr)
    assert (code, out.strip()) == (0, "resumed ops")
    code, out = cli("clean", "ops", "--state", "active", "--coordinator", broker.addr)
    assert code != 0 and "cannot clean state 'active'" in out


def test_durations() -> None:
    assert [parse_duration(s) for s in ("1h", "15m", "90s", "2d", "500ms", "250")] == [
        3_600_000, 900_000, 90_000, 172_800_000, 500, 250]
    with pytest.raises(Exception, match="not a duration"):
        parse_duration("an hour")


def test_an_unreachable_cluster_is_one_line_and_exit_1() -> None:
    code, out = cli("jobs", "ops", "--coordinator", "127.0.0.1:1")
    assert code == 1 and out.startswith("error: "), out
