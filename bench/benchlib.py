"""Shared pieces of the benchmarks: processes, CPU accounting, results files, progress.

Everything runs on this machine and talks to loopback only. Each benchmark writes JSON lines
(one per measurement) to a results file and prints a rich summary table.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu,
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": sys.version.split()[0], "platform": platform.platform()}


def cpu_seconds(pids: Sequence[int]) -> float:
    """user+system CPU of these processes and their live children (every thread).

    A process that is gone counts 0, so take both readings while the servers run.
    """
    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            pass
    return total


@dataclass
class Proc:
    """A child process the bench started (a server), stopped by pid."""

    name: str
    popen: subprocess.Popen[bytes]
    addr: str = ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, timeout: float = 20) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def spawn_ready(name: str, argv: list[str], log: Path, *, cwd: Path = ROOT,
                env: dict[str, str] | None = None, timeout: float = 60) -> Proc:
    """Start argv and wait for its first stdout line `READY <addr>`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as err:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, cwd=cwd, env=env,
                             start_new_session=True)
    assert p.stdout is not None
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline:
        line = p.stdout.readline().decode().strip()
        if line.startswith("READY ") or p.poll() is not None:
            break
    if not line.startswith("READY "):
        p.kill()
        p.wait()
        raise RuntimeError(f"{name} did not start ({line!r}); see {log}")
    return Proc(name, p, line.split(" ", 1)[1])


def wait_port(host: str, port: int, timeout: float = 30) -> None:
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Results:
    """Appends JSON lines to one results file (and keeps them for the summary)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict[str, Any]) -> None:
        row = {"ts": round(time.time(), 3), **row}
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def run_driver(argv: list[str], seconds: float, prog: Progress | None, label: str,
               cwd: Path = ROOT, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one driver process, showing a time bar; returns its JSON line."""
    task = prog.add_task(label, total=int(seconds)) if prog is not None else None
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env)
    t0 = time.monotonic()
    hard = seconds * 3 + 120  # a stuck driver must not hang the bench
    while p.poll() is None:
        time.sleep(0.2)
        if prog is not None and task is not None:
            prog.update(task, completed=min(int(time.monotonic() - t0), int(seconds)))
        if time.monotonic() - t0 > hard:
            p.kill()
    out, err = p.communicate()
    if prog is not None and task is not None:
        prog.update(task, completed=int(seconds))
        prog.remove_task(task)
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{label}: driver exited {p.returncode}: "
                           f"{err.decode()[-1500:] or out.decode()[-500:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


@contextmanager
def stopping(procs: list[Proc]) -> Iterator[list[Proc]]:
    """Stop `procs` on the way out, also when the bench itself gets SIGTERM
    (its servers run in their own sessions: no signal reaches them)."""
    with exit_on_sigterm():
        try:
            yield procs
        finally:
            for p in reversed(procs):
                p.stop()


@contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """SIGTERM raises SystemExit here, so `finally` blocks stop what was started."""
    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class CpuCap:
    """Cap a process at `cpus` cores with its own cgroup-v1 `cpu` group, as if it ran on
    a host of that size (a 2-core machine cannot add hosts; this makes each new broker
    bring its own CPU budget). Needs root and a writable /sys/fs/cgroup/cpu."""

    ROOT = Path("/sys/fs/cgroup/cpu")
    PERIOD_US = 10_000  # short: a capped process waits at most one period when throttled

    def __init__(self, cpus: float, tag: str) -> None:
        if not (self.ROOT / "cgroup.procs").exists():
            raise SystemExit(f"--broker-cpus needs the cgroup-v1 cpu controller at {self.ROOT}")
        self.cpus = cpus
        self.base = self.ROOT / f"shardq-bench-{tag}-{os.getpid()}"
        self.groups: list[Path] = []

    def apply(self, name: str, pid: int) -> None:
        group = self.base / name
        try:
            group.mkdir(parents=True, exist_ok=True)
            (group / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(int(self.cpus * self.PERIOD_US)))
            (group / "cgroup.procs").write_text(str(pid))  # v1: moves every thread
        except OSError as e:
            raise SystemExit(f"cannot cap {name} at {self.cpus} cpus in {group}: {e}") from e
        if group not in self.groups:  # a later run may reuse a broker id
            self.groups.append(group)

    def throttled_s(self) -> dict[str, float]:
        """Seconds each capped process waited for its quota so far."""
        out = {}
        for g in self.groups:
            stat = dict(line.split() for line in (g / "cpu.stat").read_text().splitlines())
            out[g.name] = int(stat.get("throttled_time", 0)) / 1e9
        return out

    def remove(self) -> None:
        """Drop the groups (call once their processes are gone)."""
        for g in [*self.groups, self.base]:
            try:
                g.rmdir()
            except OSError:
                pass
