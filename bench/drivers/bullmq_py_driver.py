"""One workload against Redis through BullMQ's Python package (pip `bullmq`).

Runs in the bench-owned venv bench/peers/pyvenv (bullmq pins croniter and msgpack versions
that differ from shardq's, so it never goes into shardq's own environment):

    bench/peers/pyvenv/bin/python bench/drivers/bullmq_py_driver.py '{"port": 6379, ...}'

Same config and output as bench/drivers/shardq_driver.py. Configured as BullMQ's "going to
production" guide says: retention by count (removeOnComplete 1000, removeOnFail 5000).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from bullmq import Queue, Worker

RETENTION = {"removeOnComplete": 1000, "removeOnFail": 5000}


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs.sort()
    return xs[min(len(xs) - 1, int(len(xs) * p))]


async def main(cfg: dict[str, Any]) -> dict[str, Any]:
    conn = {"connection": f"redis://{cfg['host']}:{cfg['port']}"}
    names = [f"{cfg['prefix']}-{i}" for i in range(int(cfg["queues"]))]
    queues = [Queue(n, conn) for n in names]
    payload = {"body": "x" * int(cfg["payload"])}
    jobs = int(cfg["jobs"])
    state = {"ops": 0, "next": 0}
    lat: list[float] = []
    t0 = time.perf_counter()
    deadline = t0 + float(cfg["seconds"])

    def more() -> bool:
        return state["ops"] < jobs and time.perf_counter() < deadline

    def pick() -> Queue:
        state["next"] += 1
        return queues[state["next"] % len(queues)]

    async def single_lane() -> None:
        while more():
            q = pick()
            state["ops"] += 1
            t = time.perf_counter()
            await q.add("j", payload, RETENTION)
            lat.append((time.perf_counter() - t) * 1000)

    async def bulk_lane() -> None:
        while more():
            k = min(int(cfg["bulk"]), jobs - state["ops"])
            state["ops"] += k
            q = pick()
            t = time.perf_counter()
            await q.addBulk([{"name": "j", "data": payload, "opts": RETENTION}] * k)
            lat.append((time.perf_counter() - t) * 1000)

    w = cfg["workload"]
    seconds = None
    if w in ("add_single", "add_concurrent"):
        n = 1 if w == "add_single" else int(cfg["concurrency"])
        await asyncio.gather(*(single_lane() for _ in range(n)))
    elif w == "add_bulk":
        await asyncio.gather(*(bulk_lane() for _ in range(int(cfg["bulk_inflight"]))))
    elif w == "e2e":
        done = 0
        finished = asyncio.Event()

        async def process(job: Any, token: str) -> None:
            nonlocal done
            done += 1
            if done >= jobs:
                finished.set()

        per = max(1, -(-int(cfg["concurrency"]) // len(names)))
        workers = [Worker(n, process, {**conn, "concurrency": per}) for n in names]
        producer = asyncio.gather(*(bulk_lane() for _ in range(int(cfg["bulk_inflight"]))))
        try:
            async with asyncio.timeout(float(cfg["seconds"])):
                await finished.wait()
        except TimeoutError:
            pass
        seconds = time.perf_counter() - t0
        state["ops"] = min(done, jobs)
        await producer
        for wk in workers:
            await wk.close()
    else:
        raise SystemExit(f"unknown workload {w}")
    if seconds is None:
        seconds = time.perf_counter() - t0
    for q in queues:
        await q.close()
    return {"ops": state["ops"], "seconds": seconds, "rate": state["ops"] / seconds,
            "p50_ms": pct(lat, .5), "p99_ms": pct(lat, .99)}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(json.loads(sys.argv[1])))), flush=True)
