"""Shared fixtures: real broker / coordinator processes on `--port 0`.

Processes are started with their own temp data dir, their bound address is
read from the `READY host:port` line (DESIGN §8), and they are always killed
by pid at the end of the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardq.router import Topology

READY_TIMEOUT_S = 20.0


class Proc:
    """A child process started by a test, with its READY address."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None,
                 log_path: Path | None = None) -> None:
        self.args = args
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self.log_path = log_path
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "shardq", *args],
            stdout=subprocess.PIPE, stderr=self._log, env=full_env,
            start_new_session=True,
        )
        self.addr = self._read_ready()
        host, _, port = self.addr.rpartition(":")
        self.host, self.port = host, int(port)
        # Keep draining stdout so the child never blocks on a full pipe.
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
            for _ in self.popen.stdout:
                pass

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """kill -9 the process group, by pid."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait(timeout=10)

    def terminate(self, timeout: float = 15.0) -> int:
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
