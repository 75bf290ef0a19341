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


class Run:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.conn = {"connection": f"redis://{cfg['host']}:{cfg['port']}"}
        self.names = [f"{cfg['prefix']}-{i}" for i in range(int(cfg["queues"]))]
        self.queues = [Queue(n, self.conn) for n in self.names]
        self.payload = {"body": "x" * int(cfg["payload"])}
        self.jobs = int(cfg["jobs"])
        self.ops = 0
        self.next = 0
        self.lat: list[float] = []
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + float(cfg["seconds"])

    def more(self) -> bool:
        return self.ops < self.jobs and time.perf_counter() < self.deadline

    def pick(self) -> Queue:
        self.next += 1
        return self.queues[self.next % len(self.queues)]

    async def single_lane(self) -> None:
        while self.more():
            q = self.pick()
            self.ops += 1
            t = time.perf_counter()
            await q.add("j", self.payload, RETENTION)
            self.lat.append((time.perf_counter() - t) * 1000)

    async def bulk_lane(self) -> None:
        while self.more():
            k = min(int(self.cfg["bulk"]), self.jobs - self.ops)
            self.ops += k
            q = self.pick()
            t = time.perf_counter()
            await q.addBulk([{"name": "j", "data": self.payload, "opts": RETENTION}] * k)
            self.lat.append((time.perf_counter() - t) * 1000)

    async def bulk(self) -> None:
        await asyncio.gather(*(self.bulk_lane() for _ in range(int(self.cfg["bulk_inflight"]))))

    async def e2e(self) -> float:
        done = 0
        finished = asyncio.Event()

        async def process(job: Any, token: str) -> None:
            nonlocal done
            done += 1
            if done >= self.jobs:
                finished.set()

        per = max(1, -(-int(self.cfg["concurrency"]) // len(self.names)))
        workers = [Worker(n, process, {**self.conn, "concurrency": per}) for n in self.names]
        producer = asyncio.ensure_future(self.bulk())
        try:
            async with asyncio.timeout(float(self.cfg["seconds"])):
                await finished.wait()
        except TimeoutError:
            pass
        seconds = time.perf_counter() - self.t0
        self.ops = min(done, self.jobs)
        await producer
        for wk in workers:
            await wk.close()
        return seconds


async def main(cfg: dict[str, Any]) -> dict[str, Any]:
    run = Run(cfg)
    w = cfg["workload"]
    seconds = None
    if w in ("add_single", "add_concurrent"):
        n = 1 if w == "add_single" else int(cfg["concurrency"])
        await asyncio.gather(*(run.single_lane() for _ in range(n)))
    elif w == "add_bulk":
        await run.bulk()
    elif w == "e2e":
        seconds = await run.e2e()
    else:
        raise SystemExit(f"unknown workload {w}")
    if seconds is None:
        seconds = time.perf_counter() - run.t0
    for q in run.queues:
        await q.close()
    return {"ops": run.ops, "seconds": seconds, "rate": run.ops / seconds,
            "p50_ms": pct(run.lat, .5), "p99_ms": pct(run.lat, .99)}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(json.loads(sys.argv[1])))), flush=True)
