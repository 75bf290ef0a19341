"""Handoff benchmark: run from a checkout, `python bench/bench_handoff.py`.

Part 1, the write pause of a moving slot. For each N (default 10k and 200k;
`--big`: 10k and 1M): a coordinator and two durable brokers, a queue Q whose
slot b1 owns holding N waiting jobs (~100-byte data, pushed with add_bulk),
and a queue U whose slot b2 owns (it never moves). Two probe clients add one
job at a time in a tight loop, one to Q and one to U, recording the wall time
of every add and whether the client retried it (TRYAGAIN, or a stale MOVED
that the client treats like one) before it was answered. A paused add shows
up as a long add. First a baseline with no move running, then
`POST /brokers/b1/drain`, which moves every slot of b1 (Q's among them) to b2.
`GET /rebalance` is polled every 20 ms to see when Q's slot is in flight and
in which phase. Reported per N: p50/p99/max add latency and the longest gap
between two answered adds, for Q during its own move, for U during that same
window and during the whole drain, and for both in the baseline; each latency
is also printed as a ratio to the baseline of the same probe in the same run.
Goal: p99 < 50 ms for Q whether it holds 10k or 1M jobs.

Part 2, scale out 3 -> 6 under load. Three durable brokers hold M waiting
jobs over 1000 queues (default 200k; `--big`: 1M) that nobody consumes;
meanwhile a steady load runs on 100 other queues: 2 producer tasks (add_bulk
of 50, paced so no more than `--lag` jobs are outstanding) and one worker
(concurrency 100). Then three brokers are started with `--coordinator`; each
is scaled out onto after its first heartbeat. Reported: how long until every
broker is active, `GET /rebalance` is idle with nothing in flight and a
dry-run plan is empty; completed jobs/s before, during and after, with
during/before as a ratio (goal: >= 70%); the per-second series; and a check
that the M backlog jobs are all still there afterwards.

Every process runs on this machine: the client (this process), the
coordinator and every broker share its cores. This is a benchmark, not a
test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_cluster import PAYLOAD, push  # noqa: E402  (bench/ is this script's own directory)
from benchlib import CpuCap, Proc  # noqa: E402

import shardq  # noqa: E402
from shardq.router import Topology, slot_of  # noqa: E402

START_TIMEOUT_S = 30.0
SYNC_TIMEOUT_S = 60.0
PUSH_TIMEOUT_S = 900.0
REBALANCE_TIMEOUT_S = 600.0
POLL_S = 0.02
CLK = time.perf_counter


# ----------------------------------------------------------------- processes
Child = Proc  # a process this script started (SIGTERM, then SIGKILL, by pid)
ALL_CHILDREN: list[Child] = []  # every process this script started, for the last-resort stop
CAPS: list[CpuCap] = []  # set by --broker-cpus: every broker started gets its own CPU quota


def _pump(src: Any, dst: Path) -> None:
    """Copy what a child still writes on stdout to its log, so the pipe never fills."""
    with open(dst, "ab") as f:
        for chunk in iter(lambda: src.read1(65536), b""):
            f.write(chunk)


def spawn(children: list[Child], name: str, args: list[str], log_dir: Path,
          env: dict[str, str] | None = None) -> Child:
    """Start `python -m shardq ARGS`, wait (bounded) for its `READY host:port` line."""
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        p = subprocess.Popen([sys.executable, "-m", "shardq", *args], stdout=subprocess.PIPE,
                             stderr=log, cwd=ROOT, start_new_session=True,
                             env={**os.environ, **(env or {})})
    child = Child(name, p, "")
    children.append(child)  # from here on the caller's finally stops it
    ALL_CHILDREN.append(child)
    assert p.stdout is not None
    fd = p.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + START_TIMEOUT_S
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or p.poll() is not None:
            raise SystemExit(f"{name} did not start (no READY line); see {log_path}")
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise SystemExit(f"{name} closed stdout before READY; see {log_path}")
            buf += chunk
    line, rest = buf.split(b"\n", 1)
    text = line.decode().strip()
    if not text.startswith("READY "):
        raise SystemExit(f"{name} did not start: {text!r}; see {log_path}")
    with open(log_path, "ab") as f:
        f.write(rest)
    threading.Thread(target=_pump, args=(p.stdout, log_path), daemon=True).start()
    child.addr = text.split(" ", 1)[1]
    return child


def foreign_processes() -> list[str]:
    """Other shardq / pytest processes on this machine (not started here): they share the
    cores with this benchmark and skew it."""
    ours = {os.getpid(), *(c.popen.pid for c in ALL_CHILDREN)}
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in ours:
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "shardq" in cmd or "pytest" in cmd:
            found.append(f"{d.name}: {cmd.strip()[:90]}")
    return found


def machine_note(when: str) -> dict[str, Any]:
    others = foreign_processes()
    load = os.getloadavg()
    return {"when": when, "loadavg_1m": load[0], "foreign_processes": len(others),
            "foreign_sample": others[:3]}


def stop_all(children: list[Child]) -> None:
    # Brokers first, the coordinator (spawned first) last.
    for c in reversed(children):
        try:
            c.stop()
        except Exception as e:  # keep stopping the others
            print(f"warning: could not stop {c.name} (pid {c.popen.pid}): {e!r}", file=sys.stderr)


def start_cluster(children: list[Child], n: int, data: Path, fast: bool,
                  copy_rate: int = 0, auto_rebalance: bool = True) -> str:
    logs = data / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    coord = spawn(children, "coordinator", ["coordinator", "--port", "0", "--expect", str(n),
                                            "--data-dir", str(data / "coordinator"),
                                            "--handoff-copy-rate", str(copy_rate),
                                            "--auto-rebalance" if auto_rebalance
                                            else "--no-auto-rebalance"], logs)
    url = f"http://{coord.addr}"
    for i in range(1, n + 1):
        start_broker(children, f"b{i}", url, data, fast)
    return url


def start_broker(children: list[Child], bid: str, url: str, data: Path, fast: bool) -> Child:
    child = spawn(children, bid, ["broker", "--id", bid, "--port", "0",
                                  "--data-dir", str(data / bid), "--coordinator", url,
                                  *(["--fast"] if fast else [])], data / "logs")
    for cap in CAPS:
        cap.apply(bid, child.pid)
    return child


# ----------------------------------------------------------------- coordinator HTTP
async def get_json(http: httpx.AsyncClient, url: str, path: str) -> Any:
    r = await http.get(url + path)
    r.raise_for_status()
    return r.json()


async def post_json(http: httpx.AsyncClient, url: str, path: str, body: Any) -> Any:
    r = await http.post(url + path, json=body)
    if r.status_code >= 300:
        raise SystemExit(f"POST {path}: {r.status_code} {r.text}")
    return r.json()


async def until(cond: Callable[[], Any], what: str, timeout: float, every: float = 0.1) -> Any:
    """Await `cond()` (a coroutine function) until it is truthy, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = await cond()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(every)


async def wait_bootstrapped(http: httpx.AsyncClient, url: str, brokers: list[str]) -> None:
    """Every broker active with slots, and the 4096 slots all owned."""

    async def ok() -> bool:
        st = await get_json(http, url, "/status")
        rows = {b["id"]: b for b in st["brokers"]}
        return (all(b in rows and rows[b]["state"] == "active" and rows[b]["slots"] > 0
                    for b in brokers) and sum(r["slots"] for r in rows.values()) == 4096)

    await until(ok, f"brokers {', '.join(brokers)} to own slots", SYNC_TIMEOUT_S)


async def rebalance_idle(http: httpx.AsyncClient, url: str) -> bool:
    r = await get_json(http, url, "/rebalance")
    return not r.get("running") and not r.get("moves_in_flight") and not r.get("pending")


def queue_owned_by(topo: Topology, owner: str, prefix: str) -> str:
    name = topo.queue_named_on(owner, prefix)
    if name is None:
        raise SystemExit(f"no queue named {prefix}-* is owned by {owner}")
    return name


async def logs_checkpointed(client: shardq.Client) -> bool:
    """Every broker's redo log is checkpointed (STATS log_rows is 0)."""
    owners = set(client.topology.brokers)
    stats = await asyncio.gather(*(client._cluster.call_broker(b, "STATS", {}) for b in owners))
    return all(st["log_rows"] == 0 for st in stats)


def install_retry_counter(client: shardq.Client) -> Counter[str]:
    """Count, per retry kind, the items the client resent (TryAgainError, MovedError, ...).

    Wraps the routing layer's per-round settle step (client internals: this is a
    benchmark probe). With one add in flight at a time, the counter's change
    across one add is that add's retries.
    """
    counts: Counter[str] = Counter()
    cluster: Any = getattr(client, "_cluster", None)
    settle = getattr(cluster, "_settle", None)
    if settle is None:
        counts["unavailable"] = -1  # cannot observe retries on this client version
        return counts

    async def counting_settle(rnd: Any, budget: Any, out: list[Any]) -> list[int]:
        for kind, entries in rnd.retry.items():
            counts[kind.__name__] += len(entries)
            after = getattr(entries[0][1], "retry_after_ms", None)
            if after is not None:  # rounds, by the wait the broker asked for
                counts[f"{kind.__name__} rounds, {after} ms"] += 1
        todo: list[int] = await settle(rnd, budget, out)
        return todo

    cluster._settle = counting_settle
    return counts


class ClientLogCounter(logging.Filter):
    """Counts the client's "lock lost, result dropped" warnings per second (and other
    warnings); prints only the first few of each, so a flood does not drown the report."""

    def __init__(self) -> None:
        super().__init__()
        self.t0 = CLK()
        self.lock_lost: Counter[int] = Counter()
        self.other = 0
        self.printed: Counter[str] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        kind = "lock lost" if "lock lost" in msg else "other"
        if kind == "lock lost":
            self.lock_lost[int(CLK() - self.t0)] += 1
        else:
            self.other += 1
        self.printed[kind] += 1
        if self.printed[kind] == 4:
            print(f"  (client log: further {kind!r} messages counted, not printed)",
                  file=sys.stderr)
        return self.printed[kind] <= 3


LOGS = ClientLogCounter()


# ----------------------------------------------------------------- part 1: pause
@dataclass
class Add:
    t0: float
    t1: float
    tryagain: int
    moved: int
    error: str | None = None

    @property
    def ms(self) -> float:
        return (self.t1 - self.t0) * 1000


@dataclass
class Probe:
    """One client adding one job at a time to one queue, recording each add."""

    client: shardq.Client
    queue: str
    adds: list[Add] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        retries = install_retry_counter(self.client)
        q = self.client.queue(self.queue)
        adds = self.adds
        while not self.stop.is_set():
            ta, mv = retries["TryAgainError"], retries["MovedError"]
            t0 = CLK()
            err = None
            try:
                await q.add("probe", PAYLOAD)
            except shardq.ShardqError as e:
                err = f"{type(e).__name__}: {e}"
            t1 = CLK()
            adds.append(Add(t0, t1, retries["TryAgainError"] - ta, retries["MovedError"] - mv,
                            err))
            if err is not None:
                await asyncio.sleep(0.01)


def window_stats(adds: list[Add], lo: float, hi: float) -> dict[str, Any]:
    """Adds whose [t0, t1] overlaps [lo, hi]: latency percentiles, longest gap, retries."""
    sel = [a for a in adds if a.t1 >= lo and a.t0 <= hi]
    if not sel:
        return {"adds": 0}
    lat = sorted(a.ms for a in sel)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p / 100 * len(lat)))]

    # Longest stretch with no add answered: between consecutive answers, and
    # from the window's first add start to its first answer.
    ends = [a.t1 for a in sel if a.error is None]
    gaps = [sel[0].t1 - sel[0].t0] + [b - a for a, b in itertools.pairwise(ends)]
    return {
        "adds": len(sel),
        "p50_ms": pct(50), "p99_ms": pct(99), "max_ms": lat[-1],
        "mean_ms": sum(lat) / len(lat),
        "longest_gap_ms": max(gaps) * 1000,
        "adds_retried": sum(1 for a in sel if a.tryagain or a.moved),
        "tryagain_resends": sum(a.tryagain for a in sel),
        "moved_resends": sum(a.moved for a in sel),
        "errors": sum(1 for a in sel if a.error),
        "first_error": next((a.error for a in sel if a.error), None),
        "window_s": hi - lo,
    }


class MoveWatch:
    """Polls GET /rebalance; remembers when each phase of the move carrying `slot` was seen."""

    def __init__(self, http: httpx.AsyncClient, url: str, slot: int) -> None:
        self.http, self.url, self.slot = http, url, slot
        self.phases: dict[str, float] = {}  # phase -> first seen
        self.last_seen: float | None = None
        self.gone_at: float | None = None  # first poll that no longer shows it in flight
        self.move: dict[str, Any] | None = None
        self.stop = asyncio.Event()
        self.polls = 0

    async def run(self) -> None:
        while not self.stop.is_set():
            t = CLK()
            try:
                r = await get_json(self.http, self.url, "/rebalance")
            except httpx.HTTPError:
                r = None
            self.polls += 1
            if r is not None:
                mine = next((m for m in r.get("moves_in_flight", [])
                             if self.slot in m.get("slots", [])), None)
                if mine is not None:
                    self.move = mine
                    self.phases.setdefault(mine["phase"], t)
                    self.last_seen = t
                elif self.last_seen is not None and self.gone_at is None:
                    self.gone_at = t
            await asyncio.sleep(POLL_S)

    def window(self) -> tuple[float, float] | None:
        """[first seen, first poll no longer seeing it] (or last seen + one poll)."""
        if not self.phases:
            return None
        end = self.gone_at if self.gone_at is not None else (self.last_seen or 0) + POLL_S
        return min(self.phases.values()), end

    def pause_window(self) -> tuple[float, float] | None:
        """From first seen frozen (freeze/catch-up/commit/activate) to cleanup or gone."""
        frozen = [self.phases[p] for p in ("freeze", "catch-up", "commit", "activate")
                  if p in self.phases]
        if not frozen:
            return None
        after = [t for p, t in self.phases.items() if p == "cleanup"]
        end = min(after) if after else (self.gone_at or (self.last_seen or 0) + POLL_S)
        return min(frozen), end


async def pause_run(n: int, a: argparse.Namespace) -> dict[str, Any]:
    data = Path(tempfile.mkdtemp(prefix=f"bench-handoff-{n}-"))
    children: list[Child] = []
    before = machine_note("start")
    try:
        url = start_cluster(children, 2, data, a.fast, a.copy_rate)
        async with httpx.AsyncClient(timeout=10) as http:
            await wait_bootstrapped(http, url, ["b1", "b2"])
            res = await _pause_measure(http, url, n, a)
            res["machine"] = [before, machine_note("end")]
            return res
    finally:
        stop_all(children)
        if not os.environ.get("BENCH_KEEP_DATA"):  # keep logs to read step timings
            shutil.rmtree(data, ignore_errors=True)


async def _pause_measure(http: httpx.AsyncClient, url: str, n: int,
                         a: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"bench": "handoff", "part": "pause", "jobs": n,
                           "mode": "fast" if a.fast else "durable"}
    async with await shardq.connect(url) as loader, await shardq.connect(url) as pq, \
            await shardq.connect(url) as pu:
        topo = loader.topology
        qname, uname = queue_owned_by(topo, "b1", "hq"), queue_owned_by(topo, "b2", "hu")
        res.update(queue=qname, slot=slot_of(qname), other_queue=uname,
                   other_slot=slot_of(uname))

        t = CLK()
        q = loader.queue(qname)
        batch, inflight = 1000, 4
        sem = asyncio.Semaphore(inflight)

        async def push(k: int) -> None:
            async with sem:
                await q.add_bulk([("j", PAYLOAD)] * k)

        async with asyncio.timeout(PUSH_TIMEOUT_S):
            await asyncio.gather(*(push(min(batch, n - i)) for i in range(0, n, batch)))
        res["push_s"] = CLK() - t
        res["waiting_before"] = (await q.counts())["waiting"]

        probe_q, probe_u = Probe(pq, qname), Probe(pu, uname)
        watch = MoveWatch(http, url, slot_of(qname))
        tasks = [asyncio.create_task(x.run()) for x in (probe_q, probe_u, watch)]
        try:
            await asyncio.sleep(0.5)  # connections open, loops warm
            t_base = CLK()
            await asyncio.sleep(a.baseline_s)
            t_drain = CLK()
            answer = await post_json(http, url, "/brokers/b1/drain", {})
            res["drain_moves_planned"] = answer.get("moves")

            async def drained() -> bool:
                st = await get_json(http, url, "/status")
                b1 = next(b for b in st["brokers"] if b["id"] == "b1")
                return b1["state"] == "drained" and b1["slots"] == 0 \
                    and await rebalance_idle(http, url)

            await until(drained, "b1 to drain", REBALANCE_TIMEOUT_S, every=0.1)
            t_done = CLK()
            await asyncio.sleep(a.after_s)
            t_end = CLK()
        finally:
            for x in (probe_q, probe_u, watch):
                x.stop.set()
            async with asyncio.timeout(30):
                await asyncio.gather(*tasks)
        prog = await get_json(http, url, "/rebalance")
        res["drain_s"] = t_done - t_drain
        res["drain_moves_done"], res["drain_moves_failed"] = prog["done"], prog["failed"]
        res["drain_errors"] = prog.get("errors", [])[:3]
        await pq.refresh_topology()
        res["owner_after"] = pq.topology.owner_of(qname)
        res["waiting_after"] = (await pq.queue(qname).counts())["waiting"]
        res["probe_adds_q"] = sum(1 for x in probe_q.adds if x.error is None)

    win = watch.window()
    pause = watch.pause_window()
    if win is None:
        res["note"] = f"the move of slot {slot_of(qname)} was never seen in flight (polled " \
                      f"every {POLL_S * 1000:.0f} ms); its window is unknown"
        win = (t_drain, t_done)
    res["move_s"] = win[1] - win[0]
    res["move_phases_ms"] = {p: round((ts - win[0]) * 1000) for p, ts in
                             sorted(watch.phases.items(), key=lambda kv: kv[1])}
    res["move_slots"] = len(watch.move["slots"]) if watch.move else None
    res["frozen_window_s"] = (pause[1] - pause[0]) if pause else None
    res["baseline_q"] = window_stats(probe_q.adds, t_base, t_drain)
    res["baseline_u"] = window_stats(probe_u.adds, t_base, t_drain)
    res["move_q"] = window_stats(probe_q.adds, *win)
    res["move_u"] = window_stats(probe_u.adds, *win)
    res["frozen_q"] = window_stats(probe_q.adds, *pause) if pause else {"adds": 0}
    res["drain_q"] = window_stats(probe_q.adds, t_drain, t_done)
    res["drain_u"] = window_stats(probe_u.adds, t_drain, t_done)
    res["after_q"] = window_stats(probe_q.adds, t_done, t_end)
    # Where the longest add of each probe fell (Q: whole run; U: during the drain),
    # relative to the start of Q's move, and Q's phase (as polled) when it ended.
    def phase_at(t: float) -> str:
        seen = [(ts, ph) for ph, ts in watch.phases.items() if ts <= t]
        if watch.gone_at is not None and t >= watch.gone_at:
            return "after Q's move"
        return max(seen)[1] if seen else "before Q's move"

    for key, adds in (("worst_q_add", probe_q.adds),
                      ("worst_u_add", [x for x in probe_u.adds if t_drain <= x.t1 <= t_done])):
        if adds:
            worst = max(adds, key=lambda x: x.t1 - x.t0)
            res[key] = {"ms": worst.ms, "start_vs_move_ms": (worst.t0 - win[0]) * 1000,
                        "q_phase_at_end": phase_at(worst.t1), "tryagain": worst.tryagain,
                        "moved": worst.moved}
    return res


PAUSE_ROWS = [
    ("Q (moving), baseline, no move", "baseline_q", "baseline_q"),
    ("Q (moving), during its move", "move_q", "baseline_q"),
    ("Q, frozen..activate (seen)", "frozen_q", "baseline_q"),
    ("Q, whole drain of b1", "drain_q", "baseline_q"),
    ("Q, after the drain (on b2)", "after_q", "baseline_q"),
    ("U (not moving), baseline", "baseline_u", "baseline_u"),
    ("U (not moving), during Q's move", "move_u", "baseline_u"),
    ("U (not moving), whole drain", "drain_u", "baseline_u"),
]


def machine_line(r: dict[str, Any]) -> str:
    m0, m1 = r["machine"]
    return (f"machine: load average {m0['loadavg_1m']:.1f} at start, {m1['loadavg_1m']:.1f} at "
            f"end; other shardq/pytest processes on the box: {m0['foreign_processes']} at start, "
            f"{m1['foreign_processes']} at end")


def print_pause(results: list[dict[str, Any]]) -> None:
    print("Part 1: write pause of a moving slot (serial add latency, ms; "
          "(x) = ratio to the same probe's baseline in the same run)")
    for r in results:
        print(f"\n  N = {r['jobs']:,} waiting jobs in {r['queue']} (slot {r['slot']}, b1 -> b2); "
              f"U = {r['other_queue']} (slot {r['other_slot']}, on b2)")
        print(f"  push {r['push_s']:.1f}s; drain of b1: {r['drain_s']:.1f}s, "
              f"{r['drain_moves_done']} moves done, {r['drain_moves_failed']} failed; "
              f"Q's move ({r['move_slots']} slots) in flight {r['move_s'] * 1000:.0f} ms, "
              f"phases first seen at {r['move_phases_ms']} ms")
        if r.get("note"):
            print(f"  note: {r['note']}")
        fw = r["frozen_window_s"]
        print(f"  Q waiting before/after: {r['waiting_before']:,} / {r['waiting_after']:,} "
              f"(+{r['probe_adds_q']:,} probe adds); owner after: {r['owner_after']}; frozen "
              f"window seen by polling: {'n/a' if fw is None else f'{fw * 1000:.0f} ms'} "
              f"(+-{POLL_S * 1000:.0f} ms)")
        print(f"  {'':34}{'adds':>7}{'p50':>16}{'p99':>16}{'max':>18}{'longest gap':>13}"
              f"{'retried':>9}{'TRYAGAIN':>9}")
        for label, key, base in PAUSE_ROWS:
            s, b = r[key], r[base]
            if not s.get("adds"):
                print(f"  {label:34}{0:>7}")
                continue

            def cell(k: str, w: int, s: dict[str, Any] = s, b: dict[str, Any] = b) -> str:
                ratio = s[k] / b[k] if b.get(k) else float("nan")
                return f"{s[k]:.2f} ({ratio:.1f}x)".rjust(w - 1).rjust(w)

            print(f"  {label:34}{s['adds']:>7}{cell('p50_ms', 16)}{cell('p99_ms', 16)}"
                  f"{cell('max_ms', 18)}{s['longest_gap_ms']:>13.1f}{s['adds_retried']:>9}"
                  f"{s['tryagain_resends']:>9}"
                  + (f"  errors {s['errors']}: {s['first_error']}" if s["errors"] else ""))
        print("  " + machine_line(r))
        for key, what in (("worst_q_add", "longest Q add of the run"),
                          ("worst_u_add", "longest U add during the drain")):
            w = r.get(key)
            if w:
                print(f"  {what}: {w['ms']:.1f} ms, started {w['start_vs_move_ms']:+.0f} ms "
                      f"from the start of Q's move, ended in Q's phase {w['q_phase_at_end']!r} "
                      f"(TRYAGAIN resends {w['tryagain']}, MOVED {w['moved']})")
    print("\n  goal: p99 < 50 ms while Q's slot moves, whether Q holds 10k or 1M jobs.")
    print("  A serial probe is stalled once per pause, so the p99 over the move window mostly "
          "says how many adds the window held;\n  the pause itself is the longest add / gap:")
    for r in results:
        mq, mu = r["move_q"], r["move_u"]
        p99, mx = mq.get("p99_ms", float("nan")), mq.get("max_ms", float("nan"))
        print(f"    N={r['jobs']:>9,}: Q p99 {p99:6.1f} ms over {mq.get('adds', 0)} adds "
              f"({'< 50' if p99 < 50 else '>= 50'}), longest add {mx:6.1f} ms "
              f"({'< 50' if mx < 50 else '>= 50'}); U (not moving) longest add during the "
              f"drain {r['drain_u'].get('max_ms', float('nan')):.1f} ms vs "
              f"{r['baseline_u'].get('max_ms', float('nan')):.1f} ms in its baseline; "
              f"U p99 during Q's move {mu.get('p99_ms', float('nan')):.1f} ms")


# ----------------------------------------------------------------- part 2: scale out
class Load:
    """`producers` tasks (add_bulk of 50, paced by `lag`) and one worker."""

    def __init__(self, url: str, queues: list[str], lag: int, t0: float,
                 producers: int = 2, concurrency: int = 100) -> None:
        self.url, self.queues, self.lag, self.t0 = url, queues, lag, t0
        self.producers, self.concurrency = producers, concurrency
        self.added = 0
        self.completed = 0
        self.per_s: Counter[int] = Counter()
        self.per_s_broker: Counter[tuple[int, str]] = Counter()  # (second, serving broker)
        self.runs: Counter[tuple[str, str]] = Counter()
        self.errors: list[str] = []
        self.stop = asyncio.Event()
        self.clients: list[shardq.Client] = []
        self.tasks: list[asyncio.Task[Any]] = []
        self.worker: Any = None
        self.retries: Counter[str] = Counter()

    async def start(self) -> None:
        prod = await shardq.connect(self.url)
        work = await shardq.connect(self.url)
        self.clients = [prod, work]
        self.retries = install_retry_counter(prod)
        for p in range(self.producers):
            self.tasks.append(asyncio.create_task(self._produce(prod, p)))
        self.worker = work.worker(self.queues, self._handle, concurrency=self.concurrency)
        self.tasks.append(asyncio.create_task(self.worker.run()))

    async def _produce(self, client: shardq.Client, p: int) -> None:
        i = p
        batch = [("load", PAYLOAD)] * 50
        while not self.stop.is_set():
            if self.added - self.completed > self.lag:
                await asyncio.sleep(0.002)
                continue
            q = self.queues[i % len(self.queues)]
            i += self.producers
            try:
                await client.queue(q).add_bulk(batch)
                self.added += 50
            except shardq.ShardqError as e:
                self.errors.append(f"{type(e).__name__}: {e}")
                await asyncio.sleep(0.05)

    def _handle(self, job: Any) -> None:
        self.completed += 1
        sec = int(CLK() - self.t0)
        self.per_s[sec] += 1
        self.per_s_broker[(sec, job.broker)] += 1
        self.runs[(job.queue, job.id)] += 1

    async def close(self) -> None:
        self.stop.set()
        async with asyncio.timeout(60):
            await asyncio.gather(*self.tasks[:self.producers])
            await self.worker.close()
            await self.tasks[self.producers]
            for c in self.clients:
                await c.aclose()


async def trace_load(client: shardq.Client, load: Load, res: dict[str, Any],
                     enabled: bool) -> None:
    """Every second: where the load's outstanding jobs sit (waiting / active
    per owner, from COUNTS on every load queue), into res["load_trace"]."""
    if not enabled:
        return
    rows: list[Any] = res.setdefault("load_trace", [])
    while True:
        t = round(CLK() - load.t0, 1)
        out = load.added - load.completed
        try:
            counts = await asyncio.gather(*(client.queue(q).counts() for q in load.queues))
        except shardq.ShardqError as e:
            rows.append([t, out, type(e).__name__])
        else:
            by: dict[str, list[int]] = {}
            for q, c in zip(load.queues, counts, strict=True):
                row = by.setdefault(client.topology.owner_of(q) or "?", [0, 0])
                row[0] += c["waiting"]
                row[1] += c["active"]
            rows.append([t, out, by])
        await asyncio.sleep(1.0)


async def scale_run(a: argparse.Namespace) -> dict[str, Any]:
    data = Path(tempfile.mkdtemp(prefix="bench-handoff-scale-"))
    children: list[Child] = []
    before = machine_note("start")
    try:
        url = start_cluster(children, 3, data, a.fast, a.copy_rate,
                            auto_rebalance=not a.prestart)
        async with httpx.AsyncClient(timeout=10) as http:
            await wait_bootstrapped(http, url, ["b1", "b2", "b3"])
            res = await _scale_measure(http, url, children, data, a)
            res["machine"] = [before, machine_note("end")]
            return res
    finally:
        stop_all(children)
        if not os.environ.get("BENCH_KEEP_DATA"):  # keep logs to read step timings
            shutil.rmtree(data, ignore_errors=True)


async def _prestart(http: httpx.AsyncClient, url: str, children: list[Child], data: Path,
                    new: list[str], fast: bool) -> float:
    """Start the new brokers before the load; they register and idle with no
    slots (the coordinator runs with --no-auto-rebalance). On a real cluster
    they start on new hosts, not on the cores the measured brokers use, so
    the window then measures the moves alone. Returns the seconds it took."""
    t = CLK()
    for b in new:
        start_broker(children, b, url, data, fast)

    async def registered() -> bool:
        rows = {b["id"] for b in (await get_json(http, url, "/status"))["brokers"]}
        return set(new) <= rows

    await until(registered, "the new brokers to register", START_TIMEOUT_S, every=0.1)
    return CLK() - t


def throttled() -> dict[str, float]:
    """Seconds each capped broker waited for its CPU quota so far ({} uncapped)."""
    return CAPS[0].throttled_s() if CAPS else {}


def throttled_since(before: dict[str, float]) -> dict[str, float]:
    return {b: round(v - before.get(b, 0.0), 2) for b, v in throttled().items()}


async def _push_backlog(loader: shardq.Client, backlog: list[str], m: int,
                        res: dict[str, Any]) -> None:
    t = CLK()
    async with asyncio.timeout(PUSH_TIMEOUT_S):
        await push(loader, backlog, m, inflight=8)  # add_bulk of <= 1000
    res["push_s"] = CLK() - t
    # The brokers write the pushed jobs to their jobs tables (a checkpoint,
    # started by the first quiet second): wait for it, or the load's
    # "before" and the scale out would both run on top of it.
    t = CLK()
    await until(lambda: logs_checkpointed(loader), "the push to be checkpointed",
                SYNC_TIMEOUT_S * 3, every=0.25)
    res["push_checkpoint_s"] = CLK() - t


async def _scale_measure(http: httpx.AsyncClient, url: str, children: list[Child], data: Path,
                         a: argparse.Namespace) -> dict[str, Any]:
    m = a.backlog
    res: dict[str, Any] = {"bench": "handoff", "part": "scale_out", "backlog_jobs": m,
                           "broker_cpus": a.broker_cpus or None,
                           "backlog_queues": 1000, "load_queues": 100, "lag_cap": a.lag,
                           "producers": a.producers, "concurrency": a.concurrency,
                           "mode": "fast" if a.fast else "durable"}
    backlog = [f"backlog-{i:04d}" for i in range(1000)]
    load_q = [f"load-{i:03d}" for i in range(100)]
    async with await shardq.connect(url) as loader:
        await _push_backlog(loader, backlog, m, res)
        new = ["b4", "b5", "b6"]
        res["prestart"] = a.prestart
        if a.prestart:
            res["spawn_s"] = await _prestart(http, url, children, data, new, a.fast)
        t0 = CLK()
        load = Load(url, load_q, a.lag, t0, a.producers, a.concurrency)
        await load.start()
        tracer = asyncio.create_task(trace_load(loader, load, res, a.trace_load))
        progress: list[tuple[float, int]] = []  # (t, slots_moved) every poll
        try:
            await asyncio.sleep(a.warmup_s)
            t_before = CLK()
            throttled_b = throttled()
            await asyncio.sleep(a.before_s)
            t_scale = CLK()
            throttled0 = throttled()
            res["throttled_before_s"] = throttled_since(throttled_b)
            if a.prestart:
                await post_json(http, url, "/rebalance", {})
            else:
                for b in new:
                    start_broker(children, b, url, data, a.fast)
                res["spawn_s"] = CLK() - t_scale
            t_started = CLK()
            first_move: float | None = None

            async def done() -> bool:
                nonlocal first_move
                prog = await get_json(http, url, "/rebalance")
                now = CLK()
                progress.append((now - t0, prog.get("slots_moved", 0)))
                if first_move is None and (prog.get("moves_in_flight") or prog.get("done")):
                    first_move = now
                if prog.get("running") or prog.get("moves_in_flight") or prog.get("pending"):
                    return False
                st = await get_json(http, url, "/status")
                rows = {b["id"]: b for b in st["brokers"]}
                return all(b in rows and rows[b]["state"] == "active" and rows[b]["slots"] > 0
                           for b in ["b1", "b2", "b3", *new])

            await until(done, "the scale out to finish", REBALANCE_TIMEOUT_S, every=0.2)
            t_done = CLK()
            # seconds each broker waited for its CPU quota during the scale out
            res["throttled_during_s"] = throttled_since(throttled0)
            plan = await post_json(http, url, "/rebalance", {"dry_run": True})
            res["residual_plan_slots"] = plan["slots"]
            res["residual_plan_moves"] = [f"{mv['source']}->{mv['target']}: {mv['slots']}"
                                          for mv in plan["moves"]]
            await asyncio.sleep(a.after_scale_s)
            t_end = CLK()
        finally:
            tracer.cancel()
            await load.close()
        st = await get_json(http, url, "/status")
        res["slots_after"] = {b["id"]: b["slots"] for b in st["brokers"]}
        prog = await get_json(http, url, "/rebalance")
        res["moves_done"], res["moves_failed"] = prog["done"], prog["failed"]
        res["slots_moved"] = prog["slots_moved"]
        res["rebalance_errors"] = prog.get("errors", [])[:3]
        await loader.refresh_topology()
        res["backlog_queues_per_broker"] = dict(sorted(Counter(
            loader.topology.owner_of(q) for q in backlog).items()))
        sem2 = asyncio.Semaphore(32)

        async def waiting(q: str) -> int:
            async with sem2:
                return int((await loader.queue(q).counts())["waiting"])

        async with asyncio.timeout(120):
            res["backlog_waiting_after"] = sum(await asyncio.gather(*(waiting(q)
                                                                    for q in backlog)))

    def rate(lo: float, hi: float) -> float:
        """Completed jobs/s over whole seconds [lo, hi) of the run's clock."""
        s0, s1 = int(lo - t0), int(hi - t0)
        if s1 <= s0:
            return float("nan")
        return sum(load.per_s[s] for s in range(s0, s1)) / (s1 - s0)

    res["scale_out_s"] = t_done - t_scale
    res["first_move_after_s"] = (first_move - t_scale) if first_move else None
    res["before_jobs_per_s"] = rate(t_before, t_scale)
    res["during_jobs_per_s"] = rate(t_scale, t_done)
    res["after_jobs_per_s"] = rate(t_done, t_end)
    during = [load.per_s[s] for s in range(int(t_scale - t0), int(t_done - t0))]
    res["during_min_1s_jobs_per_s"] = min(during) if during else None
    res["ratio_during_to_before"] = res["during_jobs_per_s"] / res["before_jobs_per_s"]
    res["ratio_min_1s_to_before"] = (min(during) / res["before_jobs_per_s"]) if during else None
    res["ratio_after_to_before"] = res["after_jobs_per_s"] / res["before_jobs_per_s"]
    res["ratio_during_to_after"] = res["during_jobs_per_s"] / res["after_jobs_per_s"]
    # The moves alone: from the first move seen in flight (the 3 brokers are up) to done.
    if first_move is not None:
        res["moves_s"] = t_done - first_move
        res["moves_jobs_per_s"] = rate(first_move, t_done)
        res["ratio_moves_to_before"] = res["moves_jobs_per_s"] / res["before_jobs_per_s"]
    res["series_t0"] = "load start"
    res["marks_s"] = {"before": t_before - t0, "scale_start": t_scale - t0,
                      "brokers_started": t_started - t0, "scale_done": t_done - t0,
                      "end": t_end - t0}
    res["completed_per_s"] = [load.per_s[s] for s in range(int(t_end - t0) + 1)]
    res["completed_per_s_by_broker"] = {
        b: [load.per_s_broker[(s, b)] for s in range(int(t_end - t0) + 1)]
        for b in sorted({b for _, b in load.per_s_broker})}
    # Acks the broker refused (LOCK_LOST): the handler ran but the job was not completed.
    lost = {s: LOGS.lock_lost[s + int(t0 - LOGS.t0)] for s in range(int(t_end - t0) + 1)}
    res["lock_lost_per_s"] = [lost[s] for s in range(int(t_end - t0) + 1)]
    res["lock_lost_total"] = sum(lost.values())
    res["acked_before_jobs_per_s"] = res["before_jobs_per_s"] - sum(
        lost[s] for s in range(int(t_before - t0), int(t_scale - t0))) / max(
        1, int(t_scale - t0) - int(t_before - t0))
    res["acked_during_jobs_per_s"] = res["during_jobs_per_s"] - sum(
        lost[s] for s in range(int(t_scale - t0), int(t_done - t0))) / max(
        1, int(t_done - t0) - int(t_scale - t0))
    res["ratio_acked_during_to_before"] = (res["acked_during_jobs_per_s"]
                                           / res["acked_before_jobs_per_s"])
    res["jobs_run_twice"] = sum(1 for c in load.runs.values() if c > 1)
    res["slots_moved_series"] = [(round(x, 2), y) for x, y in progress[:: max(1, len(progress)
                                                                            // 200)]]
    res["load_added"], res["load_completed"] = load.added, load.completed
    res["load_errors"] = len(load.errors)
    res["load_first_error"] = load.errors[0] if load.errors else None
    res["producer_retries"] = dict(load.retries)
    return res


def print_scale(r: dict[str, Any]) -> None:
    print(f"\nPart 2: scale out 3 -> 6 brokers, {r['backlog_jobs']:,} waiting jobs over 1000 "
          f"queues (pushed in {r['push_s']:.1f}s), steady load on 100 other queues "
          f"({r.get('producers', 2)} producers add_bulk 50, <= {r['lag_cap']} outstanding; "
          f"1 worker, concurrency {r.get('concurrency', 100)})")
    spawn = ("started and registered before the load, idle" if r.get("prestart")
             else "spawned inside the window")
    print(f"  new brokers {spawn} ({r['spawn_s']:.1f}s)")
    if r.get("broker_cpus"):
        before_s = r["marks_s"]["scale_start"] - r["marks_s"]["before"]
        print(f"  each broker capped at {r['broker_cpus']} cores (own cgroup, as on its own "
              f"host); seconds throttled in the {before_s:.0f} s before: "
              f"{r.get('throttled_before_s')}, during the scale out: "
              f"{r.get('throttled_during_s')}")
    print(f"  scale out took {r['scale_out_s']:.1f}s ("
          f"first move seen {r['first_move_after_s'] or float('nan'):.1f}s in); "
          f"{r['moves_done']} moves, {r['slots_moved']} slots, {r['moves_failed']} failed")
    print(f"  slots after: {r['slots_after']}; backlog queues per broker: "
          f"{r['backlog_queues_per_broker']}")
    if r["residual_plan_slots"]:
        print(f"  NOTE: once the rebalance went idle, a dry-run plan still had "
              f"{r['residual_plan_slots']} slots off their ring target "
              f"({', '.join(r['residual_plan_moves'])}); nothing re-planned them")
    print(f"  backlog waiting after: {r['backlog_waiting_after']:,} of {r['backlog_jobs']:,}"
          f" ({'all there' if r['backlog_waiting_after'] == r['backlog_jobs'] else 'MISMATCH'})")
    print("  " + machine_line(r))
    b = r["before_jobs_per_s"]
    print(f"  {'completed jobs/s':34}{'jobs/s':>10}{'ratio to before':>18}")
    for label, key in (("before (3 brokers)", "before_jobs_per_s"),
                       ("during the scale out", "during_jobs_per_s"),
                       ("  of which the moves alone", "moves_jobs_per_s"),
                       ("worst 1-s bucket during", "during_min_1s_jobs_per_s"),
                       ("after (6 brokers)", "after_jobs_per_s")):
        v = r.get(key)
        if v is None or v != v:
            print(f"  {label:34}{'n/a':>10}")
            continue
        print(f"  {label:34}{v:>10,.0f}{v / b:>17.2f}x")
    print(f"  goal during/before >= 0.70: {r['ratio_during_to_before']:.2f} "
          f"({'meets' if r['ratio_during_to_before'] >= 0.7 else 'misses'}); counting only "
          f"acks the broker accepted: {r['acked_during_jobs_per_s']:,.0f} / "
          f"{r['acked_before_jobs_per_s']:,.0f} = {r['ratio_acked_during_to_before']:.2f}; "
          f"during / after (same 6 processes): {r['ratio_during_to_after']:.2f}")
    print(f"  acks refused with LOCK_LOST (handler ran, result dropped, job redelivered after "
          f"its lock expires): {r['lock_lost_total']:,}; jobs whose handler ran twice within "
          f"the run: {r['jobs_run_twice']:,}")
    mk = r["marks_s"]
    print(f"  load: {r['load_added']:,} added, {r['load_completed']:,} completed, "
          f"{r['load_errors']} producer errors"
          + (f" (first: {r['load_first_error']})" if r["load_errors"] else "")
          + f"; producer client resends: {r['producer_retries'] or 'none'}")
    print(f"  completed/s per second since load start (before from {mk['before']:.0f}s, scale "
          f"out {mk['scale_start']:.1f}s..{mk['scale_done']:.1f}s, end {mk['end']:.0f}s):")
    series = r["completed_per_s"]
    for i in range(0, len(series), 10):
        print(f"    {i:>4}s: " + " ".join(f"{v:>6}" for v in series[i:i + 10]))
    if r["lock_lost_total"]:
        lost = r["lock_lost_per_s"]
        print("  LOCK_LOST acks per second (same clock):")
        for i in range(0, len(lost), 10):
            if any(lost[i:i + 10]):
                print(f"    {i:>4}s: " + " ".join(f"{v:>6}" for v in lost[i:i + 10]))


# ----------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big", action="store_true",
                    help="part 1 with N = 10k and 1M, part 2 with 1M backlog jobs")
    ap.add_argument("--sizes", default=None, help="part 1 queue sizes, comma-separated")
    ap.add_argument("--backlog", type=int, default=None, help="part 2 waiting jobs (M)")
    ap.add_argument("--only", choices=["pause", "scale"], default=None)
    ap.add_argument("--fast", action="store_true", help="brokers answer before commit (--fast)")
    ap.add_argument("--baseline-s", type=float, default=3.0, help="probe time before the drain")
    ap.add_argument("--after-s", type=float, default=3.0, help="part 1 time after the drain")
    ap.add_argument("--after-scale-s", type=float, default=20.0,
                    help="part 2 time after the scale out")
    # A broker checkpoints every 20k commits (~10-15 s under this load), each
    # a dip of a few seconds: a window of the first seconds of load, before
    # any, read up to 1.8x the steady rate (measured).
    ap.add_argument("--warmup-s", type=float, default=30.0, help="part 2 load warm-up")
    ap.add_argument("--before-s", type=float, default=20.0, help="part 2 time before scale out")
    ap.add_argument("--lag", type=int, default=5000, help="part 2 max outstanding load jobs")
    ap.add_argument("--concurrency", type=int, default=100,
                    help="part 2 worker concurrency (jobs it holds at once)")
    ap.add_argument("--producers", type=int, default=2,
                    help="part 2 producer tasks (each awaits its add_bulk before the next)")
    ap.add_argument("--prestart", action=argparse.BooleanOptionalAction, default=True,
                    help="part 2: start the new brokers before the load and time only the "
                         "rebalance onto them (--no-prestart: spawn them inside the window)")
    ap.add_argument("--copy-rate", type=int, default=0,
                    help="coordinator --handoff-copy-rate (jobs/s per move; 0: unpaced)")
    ap.add_argument("--broker-cpus", type=float, default=0.0,
                    help="cap each broker at this many cores (its own cgroup), as if each "
                         "ran on its own host: new brokers then bring capacity, which they "
                         "cannot on one shared machine (0: uncapped)")
    ap.add_argument("--trace-load", action="store_true",
                    help="part 2: sample every load queue's counts each second (load_trace)")
    ap.add_argument("--json", action="store_true", help="print JSON lines only")
    a = ap.parse_args()
    if a.backlog is None:
        a.backlog = 1_000_000 if a.big else 200_000
    return a


def main() -> None:
    a = parse_args()
    if a.broker_cpus:
        CAPS.append(CpuCap(a.broker_cpus, "handoff"))
    sizes = ([int(x) for x in a.sizes.split(",")] if a.sizes
             else [10_000, 1_000_000] if a.big else [10_000, 200_000])

    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(LOGS)
    logging.basicConfig(level=logging.WARNING, handlers=[handler],
                        format="  (client log) %(levelname)s %(name)s: %(message)s")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through every finally: children are stopped

    signal.signal(signal.SIGTERM, on_term)
    cores = os.cpu_count() or 1
    if not a.json:
        print(f"machine: {cores} cores, python {sys.version.split()[0]}; this client, the "
              f"coordinator and every broker share them. {'fast' if a.fast else 'durable'} "
              f"mode.\n")
    t_all = time.monotonic()
    results: list[dict[str, Any]] = []
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        if a.only != "scale":
            pause = []
            for n in sizes:
                r = runner.run(pause_run(n, a))
                pause.append(r)
                if not a.json:
                    print(f"  N={n:,}: push {r['push_s']:.1f}s, drain {r['drain_s']:.1f}s",
                          flush=True)
            results += pause
            if not a.json:
                print()
                print_pause(pause)
        if a.only != "pause":
            r = runner.run(scale_run(a))
            results.append(r)
            if not a.json:
                print_scale(r)
    if not a.json:
        print(f"\n(total {time.monotonic() - t_all:.0f}s)\n")
    for r in results:
        print(json.dumps(r, default=str))


if __name__ == "__main__":
    try:
        with contextlib.suppress(KeyboardInterrupt):
            main()
    finally:
        stop_all(ALL_CHILDREN)  # no-op for those already stopped
        for cap in CAPS:
            cap.remove()
