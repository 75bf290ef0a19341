"""Single-broker benchmark: run from a checkout, `python bench/bench_core.py`.

For durable and fast mode, with client and broker on this machine, it prints:
add_bulk jobs/s, concurrent single add jobs/s (200 in flight), one-at-a-time
add jobs/s, end-to-end jobs/s (push N, a worker with concurrency 100 drains
them), p50/p99 add latency, and broker RSS per waiting job of 100-byte data.

Each figure is also printed as a ratio to a baseline measured in the same run,
since this machine is noisy:
  * wire:    a plain msgpack echo server over the same framing, driven with
             the same frame pattern (bench/echo_server.py);
  * storage: sqlite executemany of the same rows into a WAL database with
             synchronous=FULL (what "just store it in SQLite" costs).
This is a benchmark, not a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import shardq  # noqa: E402
from shardq.codec import FrameDecoder, encode_frame  # noqa: E402

PAYLOAD = {"to": "user@example.com", "body": "x" * 60}  # packs to ~100 bytes


def start(args: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    p = subprocess.Popen([sys.executable, "-m", "shardq", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, cwd=ROOT)
    assert p.stdout is not None
    line = p.stdout.readline().decode().strip()
    if not line.startswith("READY "):
        p.kill()
        raise SystemExit(f"process did not start: {line!r}")
    return p, line.split(" ", 1)[1]


def start_broker(data_dir: str, fast: bool) -> tuple[subprocess.Popen[bytes], str]:
    args = ["broker", "--id", "b1", "--port", "0", "--data-dir", data_dir]
    return start(args + (["--fast"] if fast else []))


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# ----------------------------------------------------------------- shardq workloads
async def w_add_bulk(client: shardq.Client, n: int) -> float:
    q = client.queue("bench-bulk")
    batch = 1000
    t0 = time.perf_counter()
    pending: list[asyncio.Task[Any]] = []
    for _ in range(0, n, batch):
        pending.append(asyncio.ensure_future(q.add_bulk([("j", PAYLOAD)] * batch)))
        if len(pending) >= 4:
            await pending.pop(0)
    await asyncio.gather(*pending)
    return n / (time.perf_counter() - t0)


async def w_concurrent(client: shardq.Client, n: int,
                       inflight: int = 200) -> tuple[float, list[float]]:
    q = client.queue("bench-conc")
    lat: list[float] = []
    per = n // inflight

    async def one() -> None:
        for _ in range(per):
            t = time.perf_counter()
            await q.add("j", PAYLOAD)
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(inflight)))
    return per * inflight / (time.perf_counter() - t0), lat


async def w_serial(client: shardq.Client, seconds: float) -> tuple[float, list[float]]:
    q = client.queue("bench-serial")
    lat: list[float] = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        await q.add("j", PAYLOAD)
        lat.append(time.perf_counter() - t)
    return len(lat) / (time.perf_counter() - t0), lat


async def w_end_to_end(client: shardq.Client, n: int) -> float:
    q = client.queue("bench-e2e")
    for _ in range(0, n, 1000):
        await q.add_bulk([("j", PAYLOAD)] * 1000)
    done = 0
    finished = asyncio.Event()

    async def handle(job: Any) -> None:
        nonlocal done
        done += 1
        if done >= n:
            finished.set()

    worker = client.worker("bench-e2e", handle, concurrency=100)
    t0 = time.perf_counter()
    task = asyncio.ensure_future(worker.run())
    async with asyncio.timeout(600):
        await finished.wait()
    rate = n / (time.perf_counter() - t0)
    await worker.close()
    await task
    return rate


async def w_memory(addr: str, pid: int, n: int) -> float:
    async with await shardq.connect(addr) as client:
        q = client.queue("bench-mem")
        await q.add_bulk([("j", b"")] * 10)  # warm the queue
        before = rss_of(pid)
        data = os.urandom(50).hex()  # ~100 packed bytes each, distinct
        for _ in range(0, n, 1000):
            await q.add_bulk([("j", data)] * 1000)
        after = rss_of(pid)
    return (after - before) / n


# ----------------------------------------------------------------- baselines
class _Echo(asyncio.Protocol):
    def __init__(self) -> None:
        self.dec = FrameDecoder()
        self.futs: dict[int, asyncio.Future[Any]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        for fr in self.dec.feed(data):
            self.futs.pop(fr[0]).set_result(fr)


async def wire_baseline(addr: str, n: int, per_frame: int, inflight_frames: int) -> float:
    """Jobs/s through a plain msgpack echo server with the same framing."""
    host, port = addr.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    t, p = await loop.create_connection(_Echo, host, int(port))
    item = ["id", "j", msgpack.packb(PAYLOAD), None]
    rid = 0

    def call() -> asyncio.Future[Any]:
        nonlocal rid
        rid += 1
        f = loop.create_future()
        p.futs[rid] = f
        t.write(encode_frame([rid, "ADD", {"queue": "q", "jobs": [
            [uuid.uuid4().hex, *item[1:]] for _ in range(per_frame)]}]))  # type: ignore[attr-defined]
        return f

    t0 = time.perf_counter()
    frames = n // per_frame
    pending: list[asyncio.Future[Any]] = []
    for _ in range(frames):
        pending.append(call())
        if len(pending) >= inflight_frames:
            await pending.pop(0)
    await asyncio.gather(*pending)
    t.close()
    return frames * per_frame / (time.perf_counter() - t0)


def storage_baseline(n: int) -> float:
    """Rows/s for sqlite executemany of the same rows, WAL + synchronous=FULL."""
    with tempfile.TemporaryDirectory() as d:
        db = sqlite3.connect(os.path.join(d, "b.db"), isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE jobs(queue TEXT, id TEXT, blob BLOB, PRIMARY KEY(queue, id))"
                   " WITHOUT ROWID")
        data = msgpack.packb(PAYLOAD)
        rows = [("q", uuid.uuid4().hex, data) for _ in range(n)]
        t0 = time.perf_counter()
        for i in range(0, n, 1000):
            db.execute("BEGIN")
            db.executemany("INSERT INTO jobs VALUES (?,?,?)", rows[i:i + 1000])
            db.execute("COMMIT")
        dt = time.perf_counter() - t0
        db.close()
    return n / dt


# ----------------------------------------------------------------- driver
def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] * 1000


async def run_mode(fast: bool, a: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"mode": "fast" if fast else "durable"}
    with tempfile.TemporaryDirectory() as d:
        proc, addr = start_broker(d, fast)
        try:
            async with await shardq.connect(addr) as client:
                res["add_bulk"] = await w_add_bulk(client, a.n)
                res["concurrent_add"], lat_c = await w_concurrent(client, a.n // 2)
                res["serial_add"], lat_s = await w_serial(client, a.serial_seconds)
                res["end_to_end"] = await w_end_to_end(client, a.e2e)
            res["add_p50_ms_serial"], res["add_p99_ms_serial"] = pct(lat_s, .5), pct(lat_s, .99)
            res["add_p50_ms_200"], res["add_p99_ms_200"] = pct(lat_c, .5), pct(lat_c, .99)
        finally:
            proc.terminate()
            proc.wait(30)
    with tempfile.TemporaryDirectory() as d:
        proc, addr = start_broker(d, fast)
        try:
            res["rss_bytes_per_waiting_job"] = await w_memory(addr, proc.pid, a.mem_jobs)
            res["rss_bytes_per_job_beyond_data"] = res["rss_bytes_per_waiting_job"] - 100
        finally:
            proc.terminate()
            proc.wait(30)
    return res


async def baselines(a: argparse.Namespace) -> dict[str, float]:
    proc, addr = _start_echo()
    try:
        out = {
            "wire_bulk": await wire_baseline(addr, a.n, 1000, 4),
            "wire_200_per_frame": await wire_baseline(addr, a.n // 2, 200, 1),
            "wire_serial": await wire_baseline(addr, 5000, 1, 1),
        }
    finally:
        proc.kill()
        proc.wait()
    out["sqlite_executemany"] = storage_baseline(a.n)
    return out


def _start_echo() -> tuple[subprocess.Popen[bytes], str]:
    p = subprocess.Popen([sys.executable, str(ROOT / "bench" / "echo_server.py")],
                         stdout=subprocess.PIPE, cwd=ROOT)
    assert p.stdout is not None
    line = p.stdout.readline().decode().strip()
    return p, line.split(" ", 1)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=200_000, help="jobs for add_bulk (half for concurrent)")
    ap.add_argument("--e2e", type=int, default=100_000, help="jobs for end-to-end")
    ap.add_argument("--serial-seconds", type=float, default=3.0)
    ap.add_argument("--mem-jobs", type=int, default=100_000)
    ap.add_argument("--modes", default="durable,fast")
    ap.add_argument("--json", action="store_true", help="print JSON lines only")
    a = ap.parse_args()

    async def body() -> None:
        base = await baselines(a)
        results = [await run_mode(m == "fast", a) for m in a.modes.split(",")]
        if a.json:
            print(json.dumps({"baselines": base, "results": results}))
            return
        print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}; "
              "client and broker on the same box")
        print("baselines (same run): " + ", ".join(f"{k}={v:,.0f}/s" for k, v in base.items()))
        rows = [("add_bulk jobs/s", "add_bulk", "wire_bulk"),
                ("concurrent add jobs/s (200 in flight)", "concurrent_add", "wire_200_per_frame"),
                ("one-at-a-time add jobs/s", "serial_add", "wire_serial"),
                ("end-to-end jobs/s (worker c=100)", "end_to_end", "sqlite_executemany")]
        hdr = f"{'workload':42}" + "".join(f"{r['mode']:>26}" for r in results)
        print(hdr)
        for label, key, bkey in rows:
            cells = "".join(f"{r[key]:>12,.0f} ({r[key] / base[bkey]:.2f}x {bkey.split('_')[0]})"
                            .rjust(26) for r in results)
            print(f"{label:42}{cells}")
        for key in ("add_p50_ms_serial", "add_p99_ms_serial", "add_p50_ms_200", "add_p99_ms_200",
                    "rss_bytes_per_waiting_job", "rss_bytes_per_job_beyond_data"):
            print(f"{key:42}" + "".join(f"{r[key]:>26,.2f}" for r in results))
        print(json.dumps({"baselines": base, "results": results}))

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(body())


if __name__ == "__main__":
    main()
