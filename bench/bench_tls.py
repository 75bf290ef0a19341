"""TLS cost benchmark: run from a checkout, `python bench/bench_tls.py`.

Two standalone durable brokers on this machine, one cleartext and one with
TLS (`shardq dev-certs` certificates, verified by the client). Rounds
alternate between them in the same run (fair under a noisy machine), and
each round measures:

- add: `--adds` jobs added by `--concurrency` producer tasks (the client
  batches concurrent adds into bulk frames), jobs/s;
- e2e: `--e2e` jobs added by the same producers while one worker
  (concurrency 50) completes them; jobs/s from the first add to the last
  completion, and the add-to-handler latency p50/p99.

Prints each round, then the medians per side and the TLS/cleartext ratio.
A benchmark, not a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import shardq
from shardq.devcerts import make_dev_certs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import Proc, spawn_ready, stopping


async def add_round(target: str, ca: str | None, n: int, conc: int, tag: str) -> float:
    async with await shardq.connect(target, ssl_ca=ca) as client:
        q = client.queue(f"add-{tag}")
        per = n // conc
        t0 = time.perf_counter()

        async def producer(k: int) -> None:
            for i in range(per):
                await q.add("n", {"i": i}, job_id=f"{tag}-{k}-{i}")

        await asyncio.gather(*(producer(k) for k in range(conc)))
        return per * conc / (time.perf_counter() - t0)


async def e2e_round(target: str, ca: str | None, n: int, conc: int,
                    tag: str) -> tuple[float, float, float]:
    async with await shardq.connect(target, ssl_ca=ca) as client:
        q = client.queue(f"e2e-{tag}")
        per = n // conc
        total = per * conc
        lat: list[float] = []
        done = asyncio.Event()

        async def handle(job: shardq.Job) -> None:
            lat.append(time.time() - job.data["t"])
            if len(lat) >= total:
                done.set()

        worker = client.worker(q.name, handle, concurrency=50)
        task = asyncio.create_task(worker.run())
        t0 = time.perf_counter()

        async def producer(k: int) -> None:
            for i in range(per):
                await q.add("n", {"t": time.time()}, job_id=f"{tag}-{k}-{i}")

        await asyncio.gather(*(producer(k) for k in range(conc)))
        await asyncio.wait_for(done.wait(), 120)
        rate = total / (time.perf_counter() - t0)
        await worker.close()
        await task
        lat.sort()
        return rate, lat[len(lat) // 2] * 1000, lat[int(len(lat) * 0.99)] * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--adds", type=int, default=10_000)
    ap.add_argument("--e2e", type=int, default=5_000)
    ap.add_argument("--concurrency", type=int, default=50)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tls-"))
    certs = work / "certs"
    make_dev_certs(certs)
    ca = str(certs / "ca.pem")
    py = [sys.executable, "-m", "shardq", "broker", "--port", "0"]
    procs: list[Proc] = []
    with stopping(procs):
        procs.append(spawn_ready("plain", [*py, "--id", "p1", "--data-dir", str(work / "p")],
                                 work / "plain.log"))
        procs.append(spawn_ready("tls", [*py, "--id", "t1", "--data-dir", str(work / "t"),
                                         "--ssl-cert", str(certs / "broker.pem"),
                                         "--ssl-key", str(certs / "broker.key")],
                                 work / "tls.log"))
        sides = {"plain": (procs[0].addr, None), "tls": (procs[1].addr, ca)}
        results: dict[str, list[tuple[float, float, float, float]]] = {"plain": [], "tls": []}
        for r in range(args.rounds):
            order = ["plain", "tls"] if r % 2 == 0 else ["tls", "plain"]
            for side in order:
                addr, side_ca = sides[side]
                tag = f"{side}{r}"
                add = asyncio.run(add_round(addr, side_ca, args.adds, args.concurrency, tag))
                e2e, p50, p99 = asyncio.run(
                    e2e_round(addr, side_ca, args.e2e, args.concurrency, tag))
                results[side].append((add, e2e, p50, p99))
                print(f"round {r} {side:5}: add {add:8.0f} jobs/s  e2e {e2e:7.0f} jobs/s  "
                      f"latency p50 {p50:6.1f} ms p99 {p99:6.1f} ms", flush=True)
        med = {s: [statistics.median(x[i] for x in v) for i in range(4)]
               for s, v in results.items()}
        for s, (add, e2e, p50, p99) in med.items():
            print(f"median {s:5}: add {add:8.0f} jobs/s  e2e {e2e:7.0f} jobs/s  "
                  f"p50 {p50:6.1f} ms  p99 {p99:6.1f} ms")
        p, t = med["plain"], med["tls"]
        print(f"TLS/cleartext: add {t[0] / p[0]:.2f}x  e2e {t[1] / p[1]:.2f}x  "
              f"p50 {t[2] / p[2]:.2f}x  p99 {t[3] / p[3]:.2f}x")


if __name__ == "__main__":
    main()
