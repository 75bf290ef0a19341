"""Replication benchmark: run from a checkout, `python bench/bench_replication.py`.

In one run, on this machine (docs/design.md §12):

  * 2 brokers with `--replicas 0` and then `--replicas 1`, every queue on
    b1 (so with replicas 1, b2 is only b1's follower): durable add_bulk
    jobs/s, concurrent single adds/s and end-to-end jobs/s (push + drain),
    each replicated figure also as a ratio to the unreplicated one;
  * the follower's CPU per replicated job as a ratio of the primary's;
  * 3 brokers with `--replicas 1`: time from kill -9 of the broker holding
    `--failover-jobs` waiting jobs to the first answered write on its queue
    (detection `--heartbeat-timeout-ms`).

No cgroup caps: every process shares the machine's cores, so the follower
takes CPU from the primary; figures taken under load travel as ratios.
This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_cluster import Child, drain, push, spawn  # noqa: E402

import shardq  # noqa: E402
from shardq.router import Topology  # noqa: E402


def start(n: int, data: Path, replicas: int, timeout_ms: int) -> tuple[Child, list[Child]]:
    logs = data / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    coord = spawn("coordinator", ["coordinator", "--port", "0", "--expect", str(n),
                                  "--data-dir", str(data / "coordinator"),
                                  "--replicas", str(replicas),
                                  "--heartbeat-timeout-ms", str(timeout_ms)], logs)
    url = f"http://{coord.addr}"
    brokers = [spawn(f"b{i}", ["broker", "--id", f"b{i}", "--port", "0", "--data-dir",
                               str(data / f"b{i}"), "--coordinator", url], logs)
               for i in range(1, n + 1)]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            topo = httpx.get(url + "/topology", timeout=5).json()
        except httpx.HTTPError:
            topo = {}
        owned = Topology.from_dict(topo).slot_counts() if topo.get("epoch") else {}
        ready = len([c for c in owned.values() if c]) == n
        if ready and replicas:
            ready = all(r.get("in_sync") for r in (topo.get("replication") or {}).values()) \
                and len(topo.get("replication") or {}) == n
        if ready:
            time.sleep(1.5)  # every broker has heard the last map
            return coord, brokers
        time.sleep(0.2)
    raise SystemExit("cluster did not get ready")


def stop(coord: Child, brokers: list[Child]) -> None:
    for b in brokers:
        b.stop()
    coord.stop()


async def throughput(url: str, brokers: list[Child], a: argparse.Namespace) -> dict[str, Any]:
    async with await shardq.connect(url) as client:
        topo = client.topology
        queues = []
        i = 0
        while len(queues) < a.queues:
            name = f"rb-{i}"
            if topo.owner_of(name) == "b1":
                queues.append(name)
            i += 1
        cpu0 = [b.cpu_s() for b in brokers]
        t0 = time.perf_counter()
        await push(client, queues, a.jobs, 8)
        t1 = time.perf_counter()
        cpu1 = [b.cpu_s() for b in brokers]
        await drain(client, queues, a.jobs, 200)
        t2 = time.perf_counter()
        sem = asyncio.Semaphore(a.concurrency)

        async def one(k: int) -> None:
            async with sem:
                await client.queue(queues[k % len(queues)]).add("j", {"k": k})

        t3 = time.perf_counter()
        await asyncio.gather(*(one(k) for k in range(a.single_adds)))
        t4 = time.perf_counter()
    return {"add_bulk_jobs_per_s": a.jobs / (t1 - t0), "e2e_jobs_per_s": a.jobs / (t2 - t0),
            "concurrent_adds_per_s": a.single_adds / (t4 - t3),
            "primary_cpu_us_per_job_push": (cpu1[0] - cpu0[0]) / a.jobs * 1e6,
            "follower_cpu_us_per_job_push": (cpu1[1] - cpu0[1]) / a.jobs * 1e6}


async def failover_time(url: str, brokers: list[Child], jobs: int) -> float:
    async with await shardq.connect(url) as client:
        queue = client.topology.queue_named_on("b2", "fo")
        assert queue is not None
        q = client.queue(queue)
        for i in range(0, jobs, 1000):
            await q.add_bulk([("j", {"i": k}) for k in range(i, min(jobs, i + 1000))])
    await asyncio.sleep(2.5)  # a heartbeat with the replication lag at 0
    victim = next(b for b in brokers if b.name == "b2")
    killed = time.monotonic()
    victim.popen.kill()
    victim.popen.wait()
    async with await shardq.connect(url) as client:
        while True:
            try:
                await client.queue(queue).add("after", None)
                return time.monotonic() - killed
            except shardq.ShardqError:
                if time.monotonic() - killed > 120:
                    raise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=50_000)
    ap.add_argument("--queues", type=int, default=50)
    ap.add_argument("--single-adds", type=int, default=5_000)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--failover-jobs", default="10000",
                    help="comma-separated waiting-job counts on the killed broker")
    ap.add_argument("--heartbeat-timeout-ms", type=int, default=3000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    results: dict[str, Any] = {}
    for replicas in (0, 1):
        data = Path(tempfile.mkdtemp(prefix=f"bench-repl{replicas}-"))
        coord, brokers = start(2, data, replicas, a.heartbeat_timeout_ms)
        try:
            results[f"replicas{replicas}"] = asyncio.run(
                throughput(f"http://{coord.addr}", brokers, a))
        finally:
            stop(coord, brokers)
            shutil.rmtree(data, ignore_errors=True)
    r0, r1 = results["replicas0"], results["replicas1"]
    for k in ("add_bulk_jobs_per_s", "e2e_jobs_per_s", "concurrent_adds_per_s"):
        results[f"ratio_{k}"] = r1[k] / r0[k]
    results["follower_cpu_ratio"] = (r1["follower_cpu_us_per_job_push"]
                                     / max(r1["primary_cpu_us_per_job_push"], 1e-9))
    for jobs in (int(x) for x in a.failover_jobs.split(",")):
        data = Path(tempfile.mkdtemp(prefix="bench-failover-"))
        coord, brokers = start(3, data, 1, a.heartbeat_timeout_ms)
        try:
            results[f"failover_s_{jobs}_jobs"] = asyncio.run(
                failover_time(f"http://{coord.addr}", brokers, jobs))
        finally:
            stop(coord, brokers)
            shutil.rmtree(data, ignore_errors=True)
    if a.json:
        print(json.dumps(results, indent=2))
        return
    for k, v in results.items():
        if isinstance(v, dict):
            print(k, " ".join(f"{kk}={vv:,.1f}" for kk, vv in v.items()))
        else:
            print(f"{k}: {v:.3f}")


if __name__ == "__main__":
    main()
