"""`shardq worker module:func` as a subprocess against a real broker: it runs
jobs from a module the test writes, logs one line per failure, drains on
SIGTERM (the job in flight completes, exit 0), and a bad handler path exits
2 with a clear message."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import shardq
from tests.aio import run, until

TASKS = '''
import asyncio, os, pathlib

async def handle(job):
    if job.data.get("slow"):
        pathlib.Path(os.environ["SLOW_MARK"]).write_text(job.id)
        await asyncio.sleep(1.5)
    if job.data.get("fail"):
        raise RuntimeError("refused " + job.id)
    return {"ran": job.id}
'''


def start_worker(tmp_path: Path, addr: str, handler: str = "tasks:handle",
                 *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SLOW_MARK": str(tmp_path / "slow"), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "shardq", "worker", handler, "--queue", "cli-q", "-c", "4",
         "--coordinator", addr, *extra],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True)


def wait_ready(p: subprocess.Popen[bytes], timeout: float = 20) -> None:
    seen = threading.Event()

    def read() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            if line.startswith(b"READY "):
                seen.set()

    threading.Thread(target=read, daemon=True).start()
    assert seen.wait(timeout), "worker printed no READY line"


@pytest.fixture
def broker(start_broker):  # type: ignore[no-untyped-def]
    return start_broker("b1")


def test_worker_runs_jobs_logs_failures_and_drains_on_sigterm(broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "tasks.py").write_text(TASKS)
    p = start_worker(tmp_path, broker.addr)
    try:
        wait_ready(p)

        async def work() -> None:
            async with await shardq.connect(broker.addr) as client:
                q = client.queue("cli-q")
                ids = [await q.add("n", {"i": i}) for i in range(20)]
                await q.add("n", {"fail": True}, job_id="bad")

                async def all_done() -> bool:
                    c = await q.counts()
                    return bool(c["completed"] == 20 and c["failed"] == 1)

                await until(all_done, "20 completed and 1 failed")
                job = await q.get_job(ids[0])
                assert job is not None and job["result"] == {"ran": ids[0]}
                await q.add("n", {"slow": True}, job_id="slow")
                await until(lambda: (tmp_path / "slow").exists(), "the slow job to start")

        run(work())
        p.send_signal(signal.SIGTERM)  # while the slow job runs
        assert p.wait(timeout=20) == 0
        assert p.stderr is not None
        err = p.stderr.read().decode()

        async def after() -> None:
            async with await shardq.connect(broker.addr) as client:
                job = await client.queue("cli-q").get_job("slow")
                assert job is not None and job["state"] == "completed", job

        run(after())
        failures = [ln for ln in err.splitlines() if "failed (attempt" in ln]
        assert len(failures) == 1 and "refused bad" in failures[0], err
        assert "draining: 1 job(s) in flight" in err, err
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
        for pipe in (p.stdout, p.stderr):  # the READY reader thread ends at EOF
            if pipe is not None:
                pipe.close()


@pytest.mark.parametrize(("handler", "message"), [
    ("nosuchmodule:handle", "cannot import module 'nosuchmodule': ModuleNotFoundError"),
    ("tasks:missing", "module 'tasks' has no 'missing'"),
    ("tasks", "handler must be 'module:function'"),
    ("broken:handle", "cannot import module 'broken': ZeroDivisionError"),
])
def test_a_bad_handler_path_exits_2_with_a_clear_message(tmp_path: Path, handler: str,
                                                         message: str) -> None:
    (tmp_path / "tasks.py").write_text(TASKS)
    (tmp_path / "broken.py").write_text("x = 1 / 0\n")
    t0 = time.monotonic()
    p = start_worker(tmp_path, "127.0.0.1:1", handler)  # never connects: fails first
    _, err = p.communicate(timeout=30)
    assert p.returncode == 2
    assert f"error: {message}" in err.decode(), err
    assert time.monotonic() - t0 < 30
