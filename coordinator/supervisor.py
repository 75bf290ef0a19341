"""`shardq cluster up`: a local cluster, the coordinator and N brokers as child processes.

Each child is started with `python -m shardq ...`, its address read from its
`READY host:port` line, its stderr appended to `DATA_DIR/logs/NAME.log`.
A child that exits unexpectedly is restarted after a short backoff on the
port it first bound (so `--base-port 0` brokers keep their address). On
SIGINT/SIGTERM the brokers are stopped first (so they can tell the
coordinator), then the coordinator. Once every broker is active at epoch
>= 1 the supervisor prints `READY http://host:port` (the coordinator URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import httpx
from rich.console import Console
from rich.live import Live
from rich.text import Text

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 10.0
STABLE_AFTER_S = 30.0  # a child that ran this long gets its backoff reset
GIVE_UP_AFTER = 3  # consecutive failures before a child's first READY


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """What `shardq cluster up` takes."""

    brokers: int
    data_dir: Path
    base_port: int = 7101
    coordinator_port: int = 7070
    fast: bool = False
    token: str | None = None


class ChildFailed(Exception):
    """A child never reached READY, `GIVE_UP_AFTER` times in a row."""


class Child:
    """One supervised process; `supervise()` owns it from start to stop.

    Args:
        name: e.g. "coordinator", "b1".
        make_args: port -> arguments after `python -m shardq`.
        port: the first port to ask for (0: any free one; later starts reuse the bound one).
        log_path: where its stderr goes.
        notify: prints one line for a human.
    """

    def __init__(self, name: str, make_args: Callable[[int], list[str]], port: int,
                 log_path: Path, notify: Callable[[str], None]) -> None:
        self.name = name
        self.port = port
        self.addr: str | None = None
        self.log_path = log_path
        self.first_ready = asyncio.Event()
        self._make_args = make_args
        self._notify = notify
        self._stop = asyncio.Event()
        self._proc: asyncio.subprocess.Process | None = None

    def request_stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL after STOP_TIMEOUT_S) and do not restart."""
        self._stop.set()

    def kill_now(self) -> None:
        """SIGKILL the running process, if any (a second Ctrl-C)."""
        self._stop.set()
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    async def supervise(self) -> None:
        """Run, restart on unexpected exits, return once stopped.

        Raises:
            ChildFailed: it never printed READY, GIVE_UP_AFTER times in a row.
        """
        loop = asyncio.get_running_loop()
        backoff, failures = BACKOFF_MIN_S, 0
        while not self._stop.is_set():
            started = loop.time()
            rc = await self._run_once()
            if self._stop.is_set():
                return
            if not self.first_ready.is_set():
                failures += 1
                if failures >= GIVE_UP_AFTER:
                    raise ChildFailed(f"{self.name} did not start (exit {rc}); "
                                      f"see {self.log_path}:\n{_tail(self.log_path)}")
            if loop.time() - started >= STABLE_AFTER_S:
                backoff = BACKOFF_MIN_S
            self._notify(f"{self.name} exited (code {rc}); restarting in {backoff:g}s")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):
                    await self._stop.wait()
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _run_once(self) -> int | None:
        """Start, wait for READY, wait for exit or stop; always leaves no process behind."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "shardq", *self._make_args(self.port),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=_die_with_parent,
            )
        self._proc = proc
        assert proc.stdout is not None
        try:
            addr = await _first_of(_read_ready(proc.stdout), self._stop.wait(), READY_TIMEOUT_S)
            if isinstance(addr, str):
                self.addr = addr
                self.port = int(addr.rpartition(":")[2])
                self.first_ready.set()
                async with _draining(proc.stdout):
                    await _first_of(proc.wait(), self._stop.wait(), None)
            elif addr is None and not self._stop.is_set():
                self._notify(f"{self.name} did not print READY within {READY_TIMEOUT_S:g}s")
        finally:
            await _terminate(proc)
        return proc.returncode


async def _first_of(a: Awaitable[Any], b: Awaitable[Any], timeout: float | None) -> Any:
    """The result of whichever of `a`, `b` finishes first (None on timeout); cancels the other."""
    tasks = [asyncio.ensure_future(a), asyncio.ensure_future(b)]
    try:
        done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks)
    return next(iter(done)).result() if done else None


async def _read_ready(stream: asyncio.StreamReader) -> str | bool:
    """The address of the first `READY host:port` line; False at EOF before it."""
    while line := await stream.readline():
        text = line.decode(errors="replace").strip()
        if text.startswith("READY "):
            return text.split(" ", 1)[1]
    return False


@contextlib.asynccontextmanager
async def _draining(stream: asyncio.StreamReader) -> AsyncIterator[None]:
    """Read and drop a child's stdout so it never blocks on a full pipe."""
    async def drain() -> None:
        while await stream.read(65536):
            pass

    task = asyncio.create_task(drain())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait([task])


async def _terminate(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        async with asyncio.timeout(STOP_TIMEOUT_S):
            await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the supervisor dies, even by `kill -9` (Linux)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# -- the cluster -------------------------------------------------------------


class Cluster:
    """The coordinator and brokers b1..bN of one `cluster up`."""

    def __init__(self, config: ClusterConfig, console: Console) -> None:
        self.config = config
        self.console = console
        d = config.data_dir
        self.coordinator = Child(
            "coordinator",
            lambda port: ["coordinator", "--port", str(port), "--data-dir", str(d / "coordinator"),
                          "--expect", str(config.brokers), *self._token_args()],
            config.coordinator_port, d / "logs" / "coordinator.log", self.notify)
        self.brokers = [
            Child(f"b{i}", self._broker_args(f"b{i}"),
                  config.base_port + i - 1 if config.base_port else 0,
                  d / "logs" / f"b{i}.log", self.notify)
            for i in range(1, config.brokers + 1)
        ]

    @property
    def url(self) -> str:
        return f"http://{self.coordinator.addr}"

    def notify(self, line: str) -> None:
        self.console.print(line, highlight=False)

    def _token_args(self) -> list[str]:
        return ["--token", self.config.token] if self.config.token else []

    def _broker_args(self, name: str) -> Callable[[int], list[str]]:
        def make(port: int) -> list[str]:
            return ["broker", "--id", name, "--port", str(port),
                    "--data-dir", str(self.config.data_dir / name), "--coordinator", self.url,
                    *(["--fast"] if self.config.fast else []), *self._token_args()]
        return make

    def children(self) -> list[Child]:
        return [*self.brokers, self.coordinator]

    def http(self) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.config.token}"} if self.config.token else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=5.0)


async def run_cluster(config: ClusterConfig, out: TextIO, console: Console) -> None:
    """Run the cluster until SIGINT/SIGTERM.

    Raises:
        ChildFailed: a child could not be started.
    """
    config.data_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(config, console)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():  # second Ctrl-C: do not wait for graceful exits
            for child in cluster.children():
                child.kill_now()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        async with asyncio.TaskGroup() as tg:
            coord_task = tg.create_task(cluster.coordinator.supervise())
            await _first_of(cluster.coordinator.first_ready.wait(), stop.wait(), None)
            if not stop.is_set():
                broker_tasks = [tg.create_task(b.supervise()) for b in cluster.brokers]
                await _first_of(_all_ready(cluster.brokers), stop.wait(), None)
            else:
                broker_tasks = []
            if not stop.is_set():
                _print_listeners(cluster, out)
                await _first_of(_bootstrapped(cluster), stop.wait(), None)
            if not stop.is_set():
                print(f"READY {cluster.url}", file=out, flush=True)
                await _first_of(_show_status(cluster), stop.wait(), None)
            for b in cluster.brokers:
                b.request_stop()
            if broker_tasks:
                await asyncio.wait(broker_tasks)
            cluster.coordinator.request_stop()
            await coord_task
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _all_ready(children: list[Child]) -> bool:
    for child in children:
        await child.first_ready.wait()
    return True


def _print_listeners(cluster: Cluster, out: TextIO) -> None:
    d = cluster.config.data_dir
    print(f"coordinator {cluster.url}  data {d / 'coordinator'}  "
          f"log {cluster.coordinator.log_path}", file=out)
    for b in cluster.brokers:
        print(f"broker {b.name} {b.addr}  data {d / b.name}  log {b.log_path}", file=out)
    out.flush()


async def _bootstrapped(cluster: Cluster) -> bool:
    """Until the coordinator reports epoch >= 1 and every broker active."""
    async with cluster.http() as http:
        while True:
            status = await _get_status(http)
            if status is not None and _is_up(status, len(cluster.brokers)):
                return True
            await asyncio.sleep(0.1)


def _is_up(status: dict[str, Any], n: int) -> bool:
    active = [b for b in status.get("brokers", []) if b.get("state") == "active"]
    return int(status.get("epoch", 0)) >= 1 and len(active) >= n


async def _get_status(http: httpx.AsyncClient) -> dict[str, Any] | None:
    try:
        r = await http.get("/status")
        r.raise_for_status()
        answer = r.json()
    except (httpx.HTTPError, ValueError):
        return None
    return answer if isinstance(answer, dict) else None


async def _show_status(cluster: Cluster) -> None:
    """A live status line on a terminal; a plain line per change otherwise."""
    console = cluster.console
    async with cluster.http() as http:
        if not console.is_terminal:
            last = ""
            while True:
                line = _status_line(await _get_status(http))
                if line != last:
                    console.print(line, highlight=False)
                    last = line
                await asyncio.sleep(1.0)
        with Live(Text("…"), console=console, refresh_per_second=4, transient=True) as live:
            while True:
                live.update(Text(_status_line(await _get_status(http))))
                await asyncio.sleep(1.0)


def _status_line(status: dict[str, Any] | None) -> str:
    if status is None:
        return "coordinator unreachable (restarting?)"
    brokers = status.get("brokers", [])
    active = sum(1 for b in brokers if b.get("state") == "active")
    waiting = sum(int(b.get("waiting", 0)) for b in brokers)
    running = sum(int(b.get("active", 0)) for b in brokers)
    delayed = sum(int(b.get("delayed", 0)) for b in brokers)
    return (f"epoch {status.get('epoch')} · {active}/{len(brokers)} brokers active · "
            f"{waiting:,} waiting · {running:,} active · {delayed:,} delayed")
