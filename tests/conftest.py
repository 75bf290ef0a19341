"""Shared fixtures: real broker / coordinator processes on `--port 0`.

Processes are started with their own temp data dir, their bound address is
read from the `READY host:port` line (docs/design.md §8), and they are always killed
by pid at the end of the test.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from shardq.router import Topology
from tests.props import QUICK

READY_TIMEOUT_S = 60.0  # a bound: `cluster up` on a loaded 2-core box took over 20 s

if QUICK:  # `make check`: properties without an explicit count try fewer examples too
    settings.register_profile("quick", max_examples=20)
    settings.load_profile("quick")


class _FailingLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """Every event loop a test makes (asyncio.run, Runner, new_event_loop)
    reports what reaches its exception handler (a task that died with nobody
    awaiting it, a failing callback) to the test that made it."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[dict[str, Any]] = []
        self.loops = 0

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        loop.set_exception_handler(self._handle)
        self.loops += 1
        return loop

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.errors.append(context)
        loop.default_exception_handler(context)  # and log it as asyncio would


@pytest.fixture(autouse=True)
def close_raw_conns() -> Iterator[None]:
    """Close the test's RawConns (tests/integration/rawwire.py) it left open."""
    yield
    rawwire = sys.modules.get("tests.integration.rawwire")
    if rawwire is not None:
        while rawwire.OPEN:
            rawwire.OPEN.pop().close()


@pytest.fixture(autouse=True)
def fail_on_loop_errors() -> Iterator[None]:
    """Fail the test if an asyncio loop it ran saw an unhandled exception."""
    policy = _FailingLoopPolicy()
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(policy)
    try:
        yield
        if policy.loops:
            gc.collect()  # a task that died unobserved reports it when collected
    finally:
        asyncio.set_event_loop_policy(previous)
    if policy.errors:
        lines = []
        for ctx in policy.errors:
            exc = ctx.get("exception")
            lines.append(f"{ctx.get('message')}: {exc!r}" if exc else str(ctx.get("message")))
        pytest.fail("unhandled error(s) in the event loop:\n  " + "\n  ".join(lines))


class Proc:
    """A child process started by a test, with its READY address."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None,
                 log_path: Path | None = None, prefix: list[str] | None = None) -> None:
        """`prefix` runs it under another command (tests/netns.py: inside a
        network namespace, `ip netns exec NS`, which execs it: same pid)."""
        self.args = args
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self.log_path = log_path
        self._stopped = False  # set once the test kills or terminates it
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.popen = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "shardq", *args],
            stdout=subprocess.PIPE, stderr=self._log, env=full_env,
            start_new_session=True,
        )
        try:
            self.addr = self._read_ready()
        except BaseException:
            self.close()  # the test never gets this Proc: release its pipe and log here
            assert self.popen.stdout is not None
            self.popen.stdout.close()
            raise
        host, _, port = self.addr.rpartition(":")
        self.host, self.port = host, int(port)
        # Keep draining stdout so the child never blocks on a full pipe; the
        # lines after READY (e.g. a broker's `METRICS host:port`) are kept.
        self.lines: list[str] = []
        self._line_seen = threading.Condition()
        threading.Thread(target=self._drain_stdout, daemon=True).start()

    def _read_ready(self) -> str:
        result: list[str] = []

        def reader() -> None:
            assert self.popen.stdout is not None
            for raw in self.popen.stdout:
                line = raw.decode(errors="replace").strip()
                if line.startswith("READY "):
                    result.append(line.split(" ", 1)[1])
                    return

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        t.join(READY_TIMEOUT_S)
        if not result:
            self.kill()
            log = self.log_path.read_text(errors="replace")[-4000:] if self.log_path else ""
            raise RuntimeError(f"process {self.args} did not print READY in time\n{log}")
        return result[0]

    def _drain_stdout(self) -> None:
        assert self.popen.stdout is not None
        with self.popen.stdout:
            for raw in self.popen.stdout:
                with self._line_seen:
                    self.lines.append(raw.decode(errors="replace").strip())
                    self._line_seen.notify_all()

    def line_after_ready(self, prefix: str, timeout: float = READY_TIMEOUT_S) -> str:
        """The rest of the first stdout line after READY that starts with `prefix`."""
        def found() -> str | None:
            return next((ln[len(prefix):].strip() for ln in self.lines
                         if ln.startswith(prefix)), None)

        with self._line_seen:
            if not self._line_seen.wait_for(lambda: found() is not None, timeout):
                raise AssertionError(f"no {prefix!r} line from {self.args} in {timeout} s")
        value = found()
        assert value is not None
        return value

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def died_by_itself(self) -> str | None:
        """A line about this process if it exited without the test stopping
        it (a crash, a fatal commit error), with its log's tail: printed at
        teardown so a failing test's report says which process went away."""
        if self._stopped or self.popen.poll() is None or self.popen.returncode == 0:
            return None
        tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path else ""
        what = " ".join(self.args[:3])
        return f"{what} exited by itself with code {self.popen.returncode}:\n{tail}"

    def kill(self) -> None:
        """kill -9 the process group, by pid."""
        self._stopped = True
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait(timeout=10)

    def terminate(self, timeout: float = 15.0) -> int:
        self._stopped = True
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.returncode

    def close(self) -> None:
        self.kill()
        if self._log is not subprocess.DEVNULL:
            self._log.close()  # type: ignore[union-attr]


@pytest.fixture(autouse=True, scope="session")
def _private_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`cluster up` registers itself for `scale` in $SHARDQ_STATE_DIR
    (coordinator/cluster_control.py): the tests' clusters stay out of ~."""
    old = os.environ.get("SHARDQ_STATE_DIR")
    os.environ["SHARDQ_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    yield
    if old is None:
        os.environ.pop("SHARDQ_STATE_DIR", None)
    else:
        os.environ["SHARDQ_STATE_DIR"] = old


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[list[Proc]]:
    """Collects every process a test starts and kills them all at teardown."""
    started: list[Proc] = []
    yield started
    for p in started:
        if (line := p.died_by_itself()) is not None:
            print(line)
        p.close()


@pytest.fixture
def start_broker(procs: list[Proc], tmp_path: Path):  # type: ignore[no-untyped-def]
    """start_broker(id="b1", data_dir=None, *extra_args, env=None) -> Proc"""
    counter = [0]

    def _start(broker_id: str = "b1", *extra: str, data_dir: Path | None = None,
               env: dict[str, str] | None = None) -> Proc:
        counter[0] += 1
        ddir = data_dir or (tmp_path / f"{broker_id}-data")
        ddir.mkdir(parents=True, exist_ok=True)
        p = Proc(["broker", "--id", broker_id, "--port", "0", "--bind", "127.0.0.1",
                  "--data-dir", str(ddir), *extra],
                 env=env, log_path=tmp_path / f"{broker_id}-{counter[0]}.log")
        procs.append(p)
        return p

    return _start


def queue_on(topo: Topology, owner: str, prefix: str) -> str:
    """The first queue name `prefix-N` whose slot `owner` owns in `topo`."""
    name = topo.queue_named_on(owner, prefix)
    if name is None:
        raise AssertionError(f"no {prefix}-* queue on {owner}")
    return name
