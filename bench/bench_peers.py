"""shardq side by side with BullMQ+Redis and bunqueue: `shardq bench peers`.

Every system runs the same workloads with the same payload, queues and concurrency, one
fresh server per (system, workload), each driven by its own client in its own process:

  system                 server                                 client
  shardq-durable         N brokers (default 1) + coordinator     shardq (Python)
  shardq-fast            same, brokers with --fast               shardq (Python)
  shardq-node            same as shardq-durable                   shardq (Node.js, clients/node)
  bunqueue-memory        `bunqueue start` on bun, no data path   bunqueue/client (bun)
  bunqueue-sqlite        `bunqueue start --data-path` (SQLite)   bunqueue/client (bun)
  bullmq-node-redis      redis-server, no persistence            bullmq (Node.js)
  bullmq-node-redis-aof  redis-server, AOF everysec              bullmq (Node.js)
  bullmq-py-redis        redis-server, no persistence            bullmq (pip, Python)
  bullmq-py-redis-aof    redis-server, AOF everysec              bullmq (pip, Python)
  echo-limit             bench/echo_server.py (framing only)     raw frames (Python)
  sqlite-commit-limit    none: one WAL commit, synchronous=FULL  (add_single only)

The two limits (bench/drivers/limits_driver.py) are what a broker is held against: the
wire alone, and one durable commit; the summary prints shardq-durable against them.

Workloads: add_single, add_concurrent, add_bulk, e2e (see bench/drivers/shardq_driver.py).
Each stops at --jobs or after --seconds. Besides jobs/s and latency, the server processes'
CPU-seconds (psutil, all threads and children) over the run are recorded, per job.
A peer that cannot be installed is skipped with the reason, never given made-up numbers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cluster
import peers_setup
from benchlib import (
    BENCH,
    RESULTS,
    Proc,
    Results,
    console,
    cpu_seconds,
    machine,
    progress,
    run_driver,
    spawn_ready,
)

WORKLOADS = ["add_single", "add_concurrent", "add_bulk", "e2e"]
SYSTEMS = ["shardq-durable", "shardq-fast", "shardq-node", "bunqueue-memory", "bunqueue-sqlite",
           "bullmq-node-redis", "bullmq-node-redis-aof", "bullmq-py-redis", "bullmq-py-redis-aof",
           "echo-limit", "sqlite-commit-limit"]
# The limits run only the workloads they bound (bench/drivers/limits_driver.py).
LIMIT_WORKLOADS = {"echo-limit": {"add_single", "add_concurrent", "add_bulk"},
                   "sqlite-commit-limit": {"add_single"}}
DRIVER_LIMITS = BENCH / "drivers" / "limits_driver.py"
DRIVER_PY = BENCH / "drivers" / "shardq_driver.py"
DRIVER_BULL_PY = BENCH / "drivers" / "bullmq_py_driver.py"
DRIVER_JS = BENCH / "peers" / "driver.mjs"


class Server:
    """A started system: its server pids and the driver command for a config."""

    def __init__(self, pids: list[int], stop: Callable[[], None],
                 argv: Callable[[dict[str, Any]], list[str]]) -> None:
        self.pids, self.stop, self.argv = pids, stop, argv


def start_system(system: str, data: Path, a: argparse.Namespace) -> Server:
    if system == "echo-limit":
        echo = spawn_ready("echo", [sys.executable, str(BENCH / "echo_server.py")],
                           data / "echo.log")
        return _server(echo, lambda cfg: [sys.executable, str(DRIVER_LIMITS), json.dumps(
            {**cfg, "limit": "echo", "target": echo.addr})])
    if system == "sqlite-commit-limit":
        return Server([], lambda: None, lambda cfg: [sys.executable, str(DRIVER_LIMITS), json.dumps(
            {**cfg, "limit": "sqlite-commit", "dir": str(data)})])
    if system == "shardq-node":
        # The Node client on durable brokers, driven by the same driver.mjs as BullMQ.
        peers_setup.ensure_node_client()
        node_cluster = bench_cluster.start_cluster(a.brokers, data, False)
        node_url = node_cluster.url
        return Server([b.popen.pid for b in node_cluster.brokers], node_cluster.stop,
                      lambda cfg: ["node", str(DRIVER_JS),
                                   json.dumps({**cfg, "peer": "shardq", "target": node_url})])
    if system.startswith("shardq"):
        cluster = bench_cluster.start_cluster(a.brokers, data, system.endswith("fast"))
        url = cluster.url
        return Server([b.popen.pid for b in cluster.brokers], cluster.stop,
                      lambda cfg: [sys.executable, str(DRIVER_PY),
                                   json.dumps({**cfg, "target": url})])
    if system.startswith("bunqueue"):
        proc, port = peers_setup.start_bunqueue(data, sqlite=system.endswith("sqlite"))
        bun = str(peers_setup.BUN)
        return _server(proc, lambda cfg: [bun, str(DRIVER_JS), json.dumps(
            {**cfg, "peer": "bunqueue", "host": "127.0.0.1", "port": port})])
    aof = system.endswith("aof")
    if system.startswith("bullmq-node"):
        peers_setup.ensure_node_peers()
        proc, port = peers_setup.start_redis(data, aof)
        return _server(proc, lambda cfg: ["node", str(DRIVER_JS), json.dumps(
            {**cfg, "peer": "bullmq", "host": "127.0.0.1", "port": port})])
    py = str(peers_setup.ensure_bullmq_python())
    proc, port = peers_setup.start_redis(data, aof)
    return _server(proc, lambda cfg: [py, str(DRIVER_BULL_PY), json.dumps(
        {**cfg, "host": "127.0.0.1", "port": port})])


def _server(proc: Proc, argv: Callable[[dict[str, Any]], list[str]]) -> Server:
    return Server([proc.pid], proc.stop, argv)


def measure(system: str, workload: str, a: argparse.Namespace, prog: Any) -> dict[str, Any]:
    cfg = {"workload": workload, "jobs": a.jobs, "seconds": a.seconds, "payload": a.payload,
           "queues": a.queues, "prefix": f"bench-{workload}", "bulk": a.bulk,
           "bulk_inflight": a.bulk_inflight, "concurrency": a.concurrency}
    data = Path(tempfile.mkdtemp(prefix=f"bench-{system}-"))
    try:
        server = start_system(system, data, a)
        try:
            c0 = cpu_seconds(server.pids)
            out = run_driver(server.argv(cfg), a.seconds, prog, f"{system} {workload}",
                             cwd=peers_setup.PEERS if "node" in system or "bunq" in system
                             else BENCH.parent)
            c1 = cpu_seconds(server.pids)
        finally:
            server.stop()
    finally:
        shutil.rmtree(data, ignore_errors=True)
    brokers = a.brokers if system.startswith("shardq") else 1
    return {"bench": "peers", "system": system, "workload": workload, "brokers": brokers,
            **{k: cfg[k] for k in ("jobs", "seconds", "payload", "queues", "concurrency",
                                   "bulk")},
            "ops": out["ops"], "elapsed_s": out["seconds"], "rate": out["rate"],
            "rate_per_broker": out["rate"] / brokers,
            "p50_ms": out["p50_ms"], "p99_ms": out["p99_ms"],
            "server_cpu_s": c1 - c0,
            "server_cpu_us_per_job": (c1 - c0) / max(out["ops"], 1) * 1e6}


def check_available(system: str) -> str | None:
    """None when the system can run here, else why not (installing what it can)."""
    try:
        if system == "shardq-node":
            peers_setup.ensure_node_client()
        if system.startswith("bunqueue") or system.startswith("bullmq-node"):
            peers_setup.ensure_node_peers()
        if system.startswith("bullmq"):
            peers_setup.ensure_redis()
        if system.startswith("bullmq-py"):
            peers_setup.ensure_bullmq_python()
    except peers_setup.PeerUnavailable as e:
        return str(e)
    return None


def summary(rows: list[dict[str, Any]], skipped: dict[str, str]) -> Table:
    systems = list(dict.fromkeys(r["system"] for r in rows))
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    by = {(r["system"], r["workload"]): r for r in rows}
    t = Table(title="jobs/s per broker (server CPU-us per job)", title_justify="left")
    t.add_column("system")
    for w in workloads:
        t.add_column(w, justify="right")
    for s in systems:
        cells = []
        for w in workloads:
            r = by.get((s, w))
            cells.append("-" if r is None else
                         f"{r['rate_per_broker']:,.0f} ({r['server_cpu_us_per_job']:.0f})")
        t.add_row(s, *cells)
    for s, why in skipped.items():
        t.caption = (t.caption or "") + f"\nskipped {s}: {why[:160]}"
    return t


RATIO_BASES = [("bunqueue-sqlite", 3.0), ("bullmq-node-redis-aof", 5.0),
               ("bullmq-py-redis-aof", 5.0), ("bunqueue-memory", 1.0)]
# The Node client against BullMQ on Node: the same driver, language and event loop (no goal).
NODE_RATIO_BASES = ["bullmq-node-redis-aof", "bullmq-node-redis"]


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """shardq-durable per broker / each peer, per workload, with its goal."""
    by = {(r["system"], r["workload"]): r for r in rows}
    out = []
    for w in dict.fromkeys(r["workload"] for r in rows):
        mine = by.get(("shardq-durable", w))
        if mine is None:
            continue
        for base, goal in RATIO_BASES:
            other = by.get((base, w))
            if other is None or not other["rate_per_broker"]:
                continue
            x = mine["rate_per_broker"] / other["rate_per_broker"]
            goal_applies = goal == 1.0 or w in ("add_bulk", "e2e")
            out.append({"bench": "peers-ratio", "workload": w, "vs": base, "ratio": x,
                        "goal": goal if goal_applies else None,
                        "met": (x >= goal) if goal_applies else None})
        node = by.get(("shardq-node", w))
        for base in NODE_RATIO_BASES if node is not None else []:
            other = by.get((base, w))
            if other is not None and other["rate_per_broker"]:
                out.append({"bench": "peers-ratio", "workload": w, "system": "shardq-node",
                            "vs": base, "ratio": node["rate_per_broker"] / other["rate_per_broker"],
                            "goal": None, "met": None})
    return out


# The performance goals against the limits and bunqueue in memory (one broker, durable).
LIMIT_GOALS = [("add_concurrent", "echo-limit", 0.9), ("add_concurrent", "bunqueue-memory", 1.3),
               ("add_bulk", "bunqueue-memory", 2.0), ("e2e", "bunqueue-memory", 6.0)]


def limit_lines(rows: list[dict[str, Any]]) -> list[str]:
    """shardq-durable against the echo and commit limits and the goals, from this run."""
    by = {(r["system"], r["workload"]): r["rate_per_broker"] for r in rows}
    out = []
    mine, echo = by.get(("shardq-durable", "add_single")), by.get(("echo-limit", "add_single"))
    commit = by.get(("sqlite-commit-limit", "add_single"))
    if mine and echo and commit:
        bound = 1 / (1 / echo + 1 / commit)  # one round trip, then one commit
        x = mine / bound
        out.append(f"  shardq-durable add_single {mine:,.0f}/s = {x:.2f}x of 1/(echo round trip "
                   f"{1e6 / echo:.0f} us + one commit {1e6 / commit:.0f} us) = {bound:,.0f}/s "
                   f"(goal >= 0.85x) {'[green]met[/green]' if x >= 0.85 else '[red]missed[/red]'}")
    for w, base, goal in LIMIT_GOALS:
        m, o = by.get(("shardq-durable", w)), by.get((base, w))
        if m and o:
            x = m / o
            out.append(f"  shardq-durable / {base:22} {w:15} {x:6.2f}x (goal >= {goal:g}x) "
                       f"{'[green]met[/green]' if x >= goal else '[red]missed[/red]'}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--brokers", type=int, default=1, help="shardq brokers (rates are per broker)")
    ap.add_argument("--jobs", type=int, default=100_000, help="max jobs per workload")
    ap.add_argument("--seconds", type=float, default=10.0, help="max seconds per workload")
    ap.add_argument("--payload", type=int, default=100, help="payload bytes (a string field)")
    ap.add_argument("--queues", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=100,
                    help="in-flight adds (add_concurrent) and worker concurrency (e2e)")
    ap.add_argument("--bulk", type=int, default=1000, help="jobs per add_bulk call")
    ap.add_argument("--bulk-inflight", type=int, default=4, help="add_bulk calls in flight")
    ap.add_argument("--out", type=Path, default=RESULTS / "peers.jsonl")
    ap.add_argument("--json", action="store_true", help="print the JSON lines to stdout too")
    a = ap.parse_args(argv)
    systems = [s for s in a.systems.split(",") if s]
    workloads = [w for w in a.workloads.split(",") if w]
    bad = [s for s in systems if s not in SYSTEMS] + [w for w in workloads if w not in WORKLOADS]
    if bad:
        raise SystemExit(f"unknown system/workload: {bad}")

    results = Results(a.out)
    results.add({"bench": "machine", **machine()})
    skipped: dict[str, str] = {}
    for s in systems:
        why = check_available(s)
        if why is not None:
            skipped[s] = why
            console.print(f"[red]bench: skipping {s}:[/red] {why}")
            results.add({"bench": "peers-skipped", "system": s, "reason": why})
    todo = [(s, w) for s in systems if s not in skipped for w in workloads
            if w in LIMIT_WORKLOADS.get(s, WORKLOADS)]
    with progress() as prog:
        overall = prog.add_task("peers", total=len(todo))
        for s, w in todo:
            try:
                results.add(measure(s, w, a, prog))
            except Exception as e:  # one broken run must not hide the others
                console.print(f"[red]bench: {s} {w} failed:[/red] {e}")
                results.add({"bench": "peers-failed", "system": s, "workload": w,
                             "error": str(e)[:500]})
            prog.advance(overall)
    rows = [r for r in results.rows if r["bench"] == "peers"]
    for r in ratios(rows):
        results.add(r)
    console.print(summary(rows, skipped))
    for r in results.rows:
        if r["bench"] == "peers-ratio":
            mark = "" if r["met"] is None else (" [green]met[/green]" if r["met"]
                                               else " [red]missed[/red]")
            goal = "" if r["goal"] is None else f" (goal >= {r['goal']:.0f}x)"
            mine = r.get("system", "shardq-durable")
            console.print(f"  {mine} / {r['vs']:22} {r['workload']:15} "
                          f"{r['ratio']:6.2f}x{goal}{mark}")
    for line in limit_lines(rows):
        console.print(line)
    if a.json:
        for r in results.rows:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
