"""One workload against a shardq broker or cluster; the Python twin of bench/peers/driver.mjs.

    python bench/drivers/shardq_driver.py '{"target": "127.0.0.1:7101", "workload": ...}'

Prints one JSON line `{"ops", "seconds", "rate", "p50_ms", "p99_ms"}`. Every workload stops
at `jobs` or after `seconds`, whichever comes first. Workloads (identical for every peer):

  add_single      one add at a time, each awaited (one client task)
  add_concurrent  `concurrency` tasks each adding one job at a time
  add_bulk        add_bulk of `bulk` jobs, `bulk_inflight` calls in flight
  e2e             add_bulk producers as above while one worker (`concurrency`) completes them;
                  rate = completed / time from the first push to the last completion
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import shardq


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs.sort()
    return xs[min(len(xs) - 1, int(len(xs) * p))]


class Run:
    def __init__(self, cfg: dict[str, Any], client: shardq.Client) -> None:
        self.cfg = cfg
        self.client = client
        self.payload = {"body": "x" * int(cfg["payload"])}
        self.names = [f"{cfg['prefix']}-{i}" for i in range(int(cfg["queues"]))]
        self.queues = [client.queue(n) for n in self.names]
        self.ops = 0
        self.lat: list[float] = []
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + float(cfg["seconds"])
        self.next = 0

    def more(self) -> bool:
        return self.ops < self.cfg["jobs"] and time.perf_counter() < self.deadline

    def pick(self) -> Any:
        self.next += 1
        return self.queues[self.next % len(self.queues)]

    async def add_single(self, inflight: int) -> None:
        async def lane() -> None:
            while self.more():
                q = self.pick()
                self.ops += 1
                t = time.perf_counter()
                await q.add("j", self.payload)
                self.lat.append((time.perf_counter() - t) * 1000)

        await asyncio.gather(*(lane() for _ in range(inflight)))

    async def add_bulk(self) -> None:
        async def lane() -> None:
            while self.more():
                k = min(int(self.cfg["bulk"]), int(self.cfg["jobs"]) - self.ops)
                self.ops += k
                q = self.pick()
                t = time.perf_counter()
                await q.add_bulk([("j", self.payload)] * k)
                self.lat.append((time.perf_counter() - t) * 1000)

        await asyncio.gather(*(lane() for _ in range(int(self.cfg["bulk_inflight"]))))

    async def e2e(self) -> float:
        done = 0
        finished = asyncio.Event()
        jobs = int(self.cfg["jobs"])

        def handle(job: shardq.Job) -> None:
            nonlocal done
            done += 1
            if done >= jobs:
                finished.set()

        worker = self.client.worker(self.names, handle, concurrency=int(self.cfg["concurrency"]))
        wtask = asyncio.ensure_future(worker.run())
        producer = asyncio.ensure_future(self.add_bulk())
        try:
            async with asyncio.timeout(float(self.cfg["seconds"])):
                await finished.wait()
        except TimeoutError:
            pass
        seconds = time.perf_counter() - self.t0
        self.ops = min(done, jobs)
        await producer
        await worker.close()
        await wtask
        return seconds


async def main(cfg: dict[str, Any]) -> dict[str, Any]:
    async with await shardq.connect(cfg["target"]) as client:
        run = Run(cfg, client)
        w = cfg["workload"]
        seconds = None
        if w == "add_single":
            await run.add_single(1)
        elif w == "add_concurrent":
            await run.add_single(int(cfg["concurrency"]))
        elif w == "add_bulk":
            await run.add_bulk()
        elif w == "e2e":
            seconds = await run.e2e()
        else:
            raise SystemExit(f"unknown workload {w}")
        if seconds is None:
            seconds = time.perf_counter() - run.t0
        return {"ops": run.ops, "seconds": seconds, "rate": run.ops / seconds,
                "p50_ms": pct(run.lat, .5), "p99_ms": pct(run.lat, .99)}


if __name__ == "__main__":
    config = json.loads(sys.argv[1])
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        print(json.dumps(runner.run(main(config))), flush=True)
