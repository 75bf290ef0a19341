"""`shardq cluster up`: a local cluster, the coordinator and N brokers as child processes.

Each child is started with `python -m shardq ...`, its address read from its
`READY host:port` line, its stderr appended to `DATA_DIR/logs/NAME.log`.
A child that exits unexpectedly is restarted after a short backoff on the
port it first bound (so `--base-port 0` brokers keep their address). On
SIGINT/SIGTERM the brokers are stopped first (so they can tell the
coordinator), then the coordinator. Once every broker is active at epoch
>= 1 the supervisor prints `READY http://host:port` (the coordinator URL).

For `shardq scale out|in` it then listens on a loopback control port,
recorded with the broker list in DATA_DIR/cluster.json (cluster_control.py):
a scale out starts b(N+1)... as supervised children like the others; a
scale in stops one for good. The next `cluster up` on the same data dir
starts b1..bN plus the brokers scaled out, minus those scaled in.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hmac
import json
import os
import re
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

from shardq import coordinator_http
from shardq.secrets import new_token, read_token_file, write_token_file

from .cluster_control import (
    CLIENT_TOKEN_FILE,
    CONTROL_TOKEN_FILE,
    COORDINATOR_TOKEN_FILE,
    MAX_LINE,
    ClusterFile,
    register,
)

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
    ui_actions: bool = False  # the coordinator's dashboard may act (--ui-actions)
    registry: Path | None = None  # where `scale` finds this cluster by URL (cluster_control.py)
    replicas: int = 0  # docs/design.md §12
    # TLS for every child (README "Security and limits"): brokers and the
    # coordinator serve with ssl_cert and verify each other against ssl_ca;
    # with ssl_client_ca, brokers need a client certificate on control links.
    ssl_ca: str | None = None
    ssl_cert: str | None = None
    ssl_key: str | None = None
    ssl_client_ca: str | None = None
    ssl_coordinator_cert: str | None = None  # the coordinator's own (default ssl_cert)
    ssl_coordinator_key: str | None = None

    def tls_args(self, *, coordinator: bool) -> list[str]:
        """A child's TLS options (paths only)."""
        cert, key = self.ssl_cert, self.ssl_key
        if coordinator and self.ssl_coordinator_cert:
            cert, key = self.ssl_coordinator_cert, self.ssl_coordinator_key
        pairs = [("--ssl-ca", self.ssl_ca), ("--ssl-cert", cert), ("--ssl-key", key)]
        if not coordinator:
            pairs.append(("--ssl-client-ca", self.ssl_client_ca))
        return [arg for opt, value in pairs if value for arg in (opt, value)]


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
        self.returncode: int | None = None
        self.log_path = log_path
        self.first_ready = asyncio.Event()
        self._make_args = make_args
        self._notify = notify
        self._stop = asyncio.Event()
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        """The running process's pid, if any."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

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
        self.returncode = proc.returncode
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
    """The coordinator and the brokers of one `cluster up`: b1..bN, plus any scaled out."""

    def __init__(self, config: ClusterConfig, console: Console,
                 saved: ClusterFile | None = None) -> None:
        self.config = config
        self.console = console
        d = config.data_dir
        self.token_files = _token_files(d, config.token)
        self.coordinator = Child(
            "coordinator",
            lambda port: ["coordinator", "--port", str(port), "--data-dir", str(d / "coordinator"),
                          "--expect", str(config.brokers), *self._token_args(),
                          *config.tls_args(coordinator=True),
                          *(["--ui-actions"] if config.ui_actions else []),
                          *(["--replicas", "1"] if config.replicas else [])],
            config.coordinator_port, d / "logs" / "coordinator.log", self.notify)
        self.removed: list[str] = list(saved.removed) if saved else []
        names = {f"b{i}" for i in range(1, config.brokers + 1)}
        names.update(saved.brokers if saved else ())
        names.difference_update(self.removed)
        self.brokers = [self._child(name) for name in sorted(names, key=_natural)]

    def _child(self, name: str) -> Child:
        index = _index(name)
        port = self.config.base_port + index - 1 if self.config.base_port and index else 0
        return Child(name, self._broker_args(name), port,
                     self.config.data_dir / "logs" / f"{name}.log", self.notify)

    def add_broker(self) -> Child:
        """A new child b(K+1), K the highest index used so far (here, on disk, or removed)."""
        used = [_index(n) for n in (*(b.name for b in self.brokers), *self.removed)]
        used += [_index(p.name) for p in self.config.data_dir.iterdir() if p.is_dir()]
        child = self._child(f"b{max(used, default=0) + 1}")
        self.brokers.append(child)
        return child

    def broker(self, name: str) -> Child | None:
        return next((b for b in self.brokers if b.name == name), None)

    def save(self, control: str) -> None:
        """Record the cluster in DATA_DIR/cluster.json (cluster_control.py)."""
        ClusterFile(os.getpid(), self.url, control, [b.name for b in self.brokers],
                    self.removed).write(self.config.data_dir)
        if self.config.registry is not None:
            try:
                register(self.config.registry, self.url, self.config.data_dir)
            except OSError as exc:  # `scale` then needs --data-dir; the cluster still runs
                self.console.print(f"[yellow]cannot register the cluster in "
                                   f"{self.config.registry}: {exc}[/yellow]")

    @property
    def url(self) -> str:
        scheme = "https" if self.config.ssl_cert else "http"
        return f"{scheme}://{self.coordinator.addr}"

    def notify(self, line: str) -> None:
        self.console.print(line, highlight=False)

    def _token_args(self) -> list[str]:
        # Paths, never the tokens: a command line is readable by every local
        # user in /proc/PID/cmdline (README "Security").
        if self.token_files is None:
            return []
        client, control = self.token_files
        return ["--token-file", str(client), "--control-token-file", str(control),
                "--coordinator-token-file", str(control.parent / COORDINATOR_TOKEN_FILE)]

    @property
    def control_token(self) -> str | None:
        return read_token_file(self.token_files[1]) if self.token_files else None

    def _broker_args(self, name: str) -> Callable[[int], list[str]]:
        def make(port: int) -> list[str]:
            return ["broker", "--id", name, "--port", str(port),
                    "--data-dir", str(self.config.data_dir / name), "--coordinator", self.url,
                    *(["--fast"] if self.config.fast else []), *self._token_args(),
                    *self.config.tls_args(coordinator=False)]
        return make

    def children(self) -> list[Child]:
        return [*self.brokers, self.coordinator]

    def http(self) -> httpx.AsyncClient:
        return coordinator_http.async_client(self.url, self.control_token, timeout_s=5.0)


def _token_files(data_dir: Path, token: str | None) -> tuple[Path, Path] | None:
    """With a client token, DATA_DIR/secrets/{client,control}.token (mode 0600):
    the client token as given, and a control token made once and kept, so
    only the coordinator and the brokers (and admin commands run with
    `--data-dir`) may send handoff and term ops."""
    if not token:
        return None
    secrets_dir = data_dir / "secrets"
    client = write_token_file(secrets_dir / CLIENT_TOKEN_FILE, token)
    control = secrets_dir / CONTROL_TOKEN_FILE
    if not control.exists():
        write_token_file(control, new_token())
    # Only the coordinator's HELLO carries it: brokers take term and
    # ownership ops from it alone (README "Security and limits").
    own = secrets_dir / COORDINATOR_TOKEN_FILE
    if not own.exists():
        write_token_file(own, new_token())
    return client, control


async def run_cluster(config: ClusterConfig, out: TextIO, console: Console) -> None:
    """Run the cluster until SIGINT/SIGTERM.

    Raises:
        ChildFailed: a child could not be started.
    """
    config.data_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(config, console, ClusterFile.read(config.data_dir))
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
            control = _Control(cluster, tg)
            coord_task = tg.create_task(cluster.coordinator.supervise())
            await _first_of(cluster.coordinator.first_ready.wait(), stop.wait(), None)
            if not stop.is_set():
                for b in cluster.brokers:
                    control.tasks[b.name] = tg.create_task(b.supervise())
                await _first_of(_all_ready(cluster.brokers), stop.wait(), None)
            if not stop.is_set():
                _print_listeners(cluster, out)
                await _first_of(_bootstrapped(cluster), stop.wait(), None)
            if not stop.is_set():
                await control.listen()
                print(f"READY {cluster.url}", file=out, flush=True)
                await _first_of(_show_status(cluster), stop.wait(), None)
            await control.close()
            for b in cluster.brokers:
                b.request_stop()
            if control.tasks:
                await asyncio.wait(list(control.tasks.values()))
            cluster.coordinator.request_stop()
            await coord_task
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


class _Control:
    """The loopback control port of `shardq scale out|in` (protocol: cluster_control.py)."""

    def __init__(self, cluster: Cluster, tg: asyncio.TaskGroup) -> None:
        self.cluster = cluster
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._tg = tg
        self._server: asyncio.Server | None = None
        self._addr = ""
        self._lock = asyncio.Lock()  # one add/stop at a time: names and cluster.json

    async def listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=MAX_LINE)
        host, port = self._server.sockets[0].getsockname()[:2]
        self._addr = f"{host}:{port}"
        self.cluster.save(self._addr)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                request = json.loads(await reader.readline())
                reply = await self._dispatch(request if isinstance(request, dict) else {})
            except (ValueError, KeyError, TypeError, OSError, ChildFailed) as e:
                reply = {"ok": False, "error": str(e) or repr(e)}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        token = self.cluster.config.token
        if token and not hmac.compare_digest(str(request.get("token", "")), token):
            return {"ok": False, "error": "missing or wrong token"}
        op = request.get("op")
        if op == "list":
            return {"ok": True, "brokers": [{"id": b.name, "addr": b.addr, "pid": b.pid}
                                            for b in self.cluster.brokers]}
        async with self._lock:
            if op == "add":
                count = request.get("count", 1)
                if not isinstance(count, int) or not 1 <= count <= 64:
                    raise ValueError(f"count must be an int in [1, 64], got {count!r}")
                return {"ok": True, "brokers": await self._add(count)}
            if op == "stop":
                return {"ok": True, **await self._stop(str(request.get("id")))}
        raise ValueError(f"unknown op {op!r}")

    async def _add(self, count: int) -> list[dict[str, Any]]:
        children = [self.cluster.add_broker() for _ in range(count)]
        for child in children:
            self.tasks[child.name] = self._tg.create_task(self._supervise_added(child))
        self.cluster.save(self._addr)
        self.cluster.notify(f"scale out: starting {', '.join(c.name for c in children)}")
        started = []
        for child in children:
            ready = asyncio.ensure_future(child.first_ready.wait())
            await asyncio.wait([ready, self.tasks[child.name]],
                               return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if not child.first_ready.is_set():
                raise ChildFailed(f"{child.name} did not start; see {child.log_path}")
            started.append({"id": child.name, "addr": child.addr})
        return started

    async def _supervise_added(self, child: Child) -> None:
        # A broker that fails to start must not take the running cluster down.
        try:
            await child.supervise()
        except ChildFailed as e:
            self.cluster.notify(f"scale out failed: {e}")
            if child in self.cluster.brokers:
                self.cluster.brokers.remove(child)
                self.cluster.save(self._addr)

    async def _stop(self, name: str) -> dict[str, Any]:
        child = self.cluster.broker(name)
        if child is None:
            raise KeyError(f"{name} is not a broker of this cluster")
        self.cluster.notify(f"scale in: stopping {name}")
        child.request_stop()
        task = self.tasks.pop(name, None)
        if task is not None:
            await asyncio.wait([task])
        self.cluster.brokers.remove(child)
        self.cluster.removed.append(name)
        self.cluster.save(self._addr)
        return {"id": name, "code": child.returncode}


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
    """Until the coordinator reports epoch >= 1 (bootstrap made b1..bN active) and
    every broker is registered and not dead (a broker drained before keeps its state)."""
    names = [b.name for b in cluster.brokers]
    async with cluster.http() as http:
        while True:
            status = await _get_status(http)
            if status is not None and _is_up(status, names):
                return True
            await asyncio.sleep(0.1)


def _is_up(status: dict[str, Any], names: list[str]) -> bool:
    states = {b.get("id"): b.get("state") for b in status.get("brokers", [])}
    return int(status.get("epoch", 0)) >= 1 and all(
        states.get(n) not in (None, "dead") for n in names)


_DIGITS = re.compile(r"(\d+)")


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in _DIGITS.split(name)]


def _index(name: str) -> int:
    """3 for "b3"; 0 for a name that is not b<number>."""
    m = re.fullmatch(r"b(\d+)", name)
    return int(m.group(1)) if m else 0


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
