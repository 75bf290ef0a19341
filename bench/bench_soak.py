"""Soak benchmark: run from a checkout, `python bench/bench_soak.py [--minutes 30]`.

A coordinator and two durable brokers on this machine under a steady mixed
load for `--minutes`: producers add `--rate` jobs/s over `--queues`
queues (one in 7 delayed by 0.5 s); a worker (concurrency 50) completes
them, failing the first attempt of one job in 10 (attempts=2, so it
completes on its retry); every minute one queue is moved to the other
broker (a handoff under load).

Every minute it prints the brokers' RSS and open fds (summed), the size of
their WAL files, the p99 add latency of that minute and the jobs added and
completed so far. At the end the producers stop, the backlog is worked off,
and the verdict says whether RSS, fds and WAL stayed flat after warm-up and
whether every added job completed exactly once. Warm-up is the first half
of the run: the brokers' bounded memories (100,000 remembered ack tokens and
100,000 dedup tombstones per broker) fill within it at the default rate
(100,000 / 250 removes a second on each broker: about 7 minutes). Flat: the
last minute within 1.1x the RSS, +8 fds and +64 MiB WAL of the middle
minute's; the RSS slope of the second half is printed too.
A benchmark, not a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

import shardq
from shardq.router import Topology

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import Proc, spawn_ready, stopping

BROKERS = ("b1", "b2")
MIB = 1024 * 1024
WARMUP_RSS_FACTOR, WARMUP_FDS, WARMUP_WAL = 1.1, 8, 64 * 1024 * 1024


@dataclass
class Minute:
    rss: int
    fds: int
    wal: int
    p99_ms: float
    added: int
    completed: int


@dataclass
class Load:
    added: set[str] = field(default_factory=set)
    completed: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    moves: int = 0


def sample(procs: list[Proc], data: Path) -> tuple[int, int, int]:
    rss = fds = 0
    for p in procs:
        if p.name in BROKERS:
            ps = psutil.Process(p.pid)
            rss += ps.memory_info().rss
            fds += ps.num_fds()
    wal = sum(f.stat().st_size for f in data.glob("b*/*-wal"))
    return rss, fds, wal


async def producer(client: shardq.Client, load: Load, queues: list[str], rate: float,
                   stop: asyncio.Event, k: int, n_producers: int) -> None:
    per_s = rate / n_producers
    i = 0
    start = time.perf_counter()
    while not stop.is_set():
        q = client.queue(queues[i % len(queues)])
        jid = f"p{k}-{i}"
        t0 = time.perf_counter()
        # Completed jobs are kept to the last 1,000 per queue (BullMQ's
        # removeOnComplete: {count}), as a long-running deployment would:
        # keeping them all makes memory grow by design, not by a leak.
        await q.add("n", {"fail": i % 10 == 0}, job_id=jid, attempts=2,
                    delay_ms=500 if i % 7 == 0 else 0, remove_on_complete=1000)
        load.latencies.append(time.perf_counter() - t0)
        load.added.add(jid)
        i += 1
        ahead = start + i / per_s - time.perf_counter()
        if ahead > 0:
            await asyncio.sleep(ahead)


async def mover(url: str, load: Load, queues: list[str], stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 60)
                return
            except TimeoutError:
                pass
            q = queues[load.moves % len(queues)]
            topo = Topology.from_dict((await http.get("/topology")).json())
            to = "b2" if topo.owner_of(q) == "b1" else "b1"
            r = await http.post(f"/queues/{q}/move", json={"to": to})
            load.moves += 1
            print(f"  move {q} -> {to}: HTTP {r.status_code}", flush=True)


async def soak(url: str, procs: list[Proc], data: Path, args: argparse.Namespace) -> None:
    load = Load()
    queues = [f"soak-{i}" for i in range(args.queues)]
    minutes: list[Minute] = []
    async with await shardq.connect(url) as client:

        async def handle(job: shardq.Job) -> None:
            if job.data["fail"] and job.attempts_made == 0:
                raise RuntimeError("first attempt fails on purpose")
            load.completed[job.id] = load.completed.get(job.id, 0) + 1

        worker = client.worker(queues, handle, concurrency=50)
        wtask = asyncio.create_task(worker.run())
        stop = asyncio.Event()
        tasks = [asyncio.create_task(producer(client, load, queues, args.rate, stop, k, 10))
                 for k in range(10)]
        tasks.append(asyncio.create_task(mover(url, load, queues, stop)))
        for m in range(args.minutes):
            await asyncio.sleep(60)
            lat, load.latencies = sorted(load.latencies), []
            p99 = lat[int(len(lat) * 0.99)] * 1000 if lat else 0.0
            rss, fds, wal = sample(procs, data)
            minutes.append(Minute(rss, fds, wal, p99, len(load.added), len(load.completed)))
            print(f"minute {m + 1:3}: rss {rss / 2**20:7.1f} MiB  fds {fds:4}  "
                  f"wal {wal / 2**20:6.1f} MiB  add p99 {p99:7.1f} ms  "
                  f"added {len(load.added):8}  completed {len(load.completed):8}", flush=True)
        stop.set()
        await asyncio.gather(*tasks)
        deadline = time.monotonic() + 120
        while load.added - load.completed.keys() and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        await worker.close()
        await wtask
    verdict(minutes, load)


def verdict(minutes: list[Minute], load: Load) -> None:
    missing = load.added - load.completed.keys()
    twice = [j for j, n in load.completed.items() if n > 1]
    flat = True
    if len(minutes) >= 2:
        first, last = minutes[len(minutes) // 2 - 1], minutes[-1]
        flat = (last.rss <= first.rss * WARMUP_RSS_FACTOR and last.fds <= first.fds + WARMUP_FDS
                and last.wal <= first.wal + WARMUP_WAL)
        span = len(minutes) - len(minutes) // 2
        print(f"after warm-up (minute {len(minutes) // 2} to {len(minutes)}): RSS "
              f"{first.rss / MIB:.1f} -> {last.rss / MIB:.1f} MiB "
              f"({(last.rss - first.rss) / MIB / span:+.2f} MiB a minute), fds "
              f"{first.fds} -> {last.fds}, WAL {first.wal / MIB:.1f} -> {last.wal / MIB:.1f} MiB")
    print(f"moves: {load.moves}; added {len(load.added)}, completed {len(load.completed)}, "
          f"missing {len(missing)}, completed more than once {len(twice)}")
    print(f"verdict: {'FLAT' if flat else 'GROWING'} after warm-up; "
          f"{'nothing lost' if not missing else f'{len(missing)} LOST'}"
          f"{'' if not twice else f', {len(twice)} run twice (at-least-once redelivery)'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=int, default=30)
    ap.add_argument("--rate", type=float, default=500.0, help="adds per second, in all")
    ap.add_argument("--queues", type=int, default=8)
    args = ap.parse_args()
    data = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    py = [sys.executable, "-m", "shardq"]
    procs: list[Proc] = []
    with stopping(procs):
        procs.append(spawn_ready("coordinator", [*py, "coordinator", "--port", "0", "--expect",
                                                 str(len(BROKERS)), "--data-dir",
                                                 str(data / "coordinator")],
                                 data / "logs" / "coordinator.log"))
        url = f"http://{procs[0].addr}"
        for b in BROKERS:
            procs.append(spawn_ready(b, [*py, "broker", "--id", b, "--port", "0", "--data-dir",
                                         str(data / b), "--coordinator", url],
                                     data / "logs" / f"{b}.log"))
        print(f"soak: {args.minutes} min, {args.rate:g} adds/s over {args.queues} queues, "
              f"data in {data}", flush=True)
        asyncio.run(soak(url, procs, data, args))


if __name__ == "__main__":
    main()
