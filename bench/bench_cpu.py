"""CPU-seconds per job against the number of brokers: `shardq bench cpu`.

For each broker count (default 1,2,3,4): a fresh local cluster (coordinator + brokers, each
its own process), one client pushes --jobs over --queues queues with add_bulk and one worker
drains them (bench/bench_cluster.py's `measure`). The brokers' CPU (utime+stime from /proc,
every thread) divided by the jobs is what sharding must keep flat: on this 2-core box the
aggregate throughput cannot grow with brokers, but the work per job must not either.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import uvloop
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cluster
from benchlib import RESULTS, Results, console, machine, progress


def one(n: int, a: argparse.Namespace) -> dict[str, Any]:
    data = Path(tempfile.mkdtemp(prefix=f"bench-cpu-{n}-"))
    try:
        cluster = bench_cluster.start_cluster(n, data, a.fast)
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                res: dict[str, Any] = runner.run(bench_cluster.measure(cluster, n, a))
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(data, ignore_errors=True)
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--brokers", default="1,2,3,4", help="broker counts; the first is the base")
    ap.add_argument("-n", "--jobs", type=int, default=100_000)
    ap.add_argument("--queues", type=int, default=300)
    ap.add_argument("--inflight", type=int, default=8, help="add_bulk calls in flight")
    ap.add_argument("--concurrency", type=int, default=256, help="worker concurrency")
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "cpu.jsonl")
    a = ap.parse_args(argv)
    counts = [int(x) for x in a.brokers.split(",") if x]
    results = Results(a.out)
    results.add({"bench": "machine", **machine()})
    rows = []
    with progress() as prog:
        task = prog.add_task("clusters of 1..N brokers", total=len(counts))
        for n in counts:
            r = one(n, a)
            r.pop("slots", None)
            rows.append(r)
            prog.advance(task)
    base = rows[0]
    t = Table(title=f"CPU per job vs brokers ({a.jobs:,} jobs over {a.queues} queues, "
                    f"{'fast' if a.fast else 'durable'})", title_justify="left")
    for c in ("brokers", "add jobs/s", "e2e jobs/s", "broker CPU us/job", "vs base",
              "push", "drain", "client CPU us/job"):
        t.add_column(c, justify="right")
    for r in rows:
        ratio = r["broker_cpu_us_per_job"] / base["broker_cpu_us_per_job"]
        results.add({**r, "bench": "cpu", "cpu_ratio_to_base": ratio})
        t.add_row(str(r["brokers"]), f"{r['add_jobs_per_s']:,.0f}", f"{r['e2e_jobs_per_s']:,.0f}",
                  f"{r['broker_cpu_us_per_job']:.1f}", f"{ratio:.2f}x",
                  f"{r['broker_cpu_us_per_job_push']:.1f}",
                  f"{r['broker_cpu_us_per_job_drain']:.1f}",
                  f"{r['client_cpu_us_per_job']:.1f}")
    console.print(t)


if __name__ == "__main__":
    main()
