"""Fuzz a live broker with random and mutated frames while a client works.

A broker runs (with a token). Fuzzing connections send random bytes and
mutated frames, half before HELLO (the pre-auth path: 4 KB frames, refusal
limit, handshake deadline) and half after a good HELLO (every op with
random or mutated args, control ops included, which a client token must
not reach). Meanwhile a well-behaved client pushes jobs and a worker works
them. Printed: frames sent per second, the broker's peak RSS, and whether
the client lost nothing and saw no error (each job completed exactly once).
A connection the broker closes is opened again.

    python bench/bench_fuzz.py [--frames 1000000] [--fuzzers 8]

A benchmark, not a test (docs/design.md §4: malformed input never kills the
broker or another client's connection).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgpack

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import shardq  # noqa: E402
from shardq import protocol as p  # noqa: E402
from shardq.codec import encode_frame  # noqa: E402

TOKEN = "fuzz-token"
OPS = [v for k, v in vars(p).items() if k.isupper() and isinstance(v, str) and v.isupper()
       and k not in ("OK",)]
POOL = 20_000


def _rand_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.randrange(-2**63, 2**64)
    if kind == 1:
        return rng.choice(["q", "", "x" * rng.randrange(600), "ä", "fuzz-q"])
    if kind == 2:
        return os.urandom(rng.randrange(64))
    if kind == 3:
        return rng.choice([None, True, False, 0, -1, 10**12])
    if kind == 4:
        return rng.random()
    if kind == 5:
        return rng.choice(["queue", "jobs", "items", "token", "term", "move_id"])
    if kind == 6:
        return [_rand_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    return {rng.choice(["queue", "jobs", "items", "queues", "count", "term", "move_id",
                        "slots", "id", "token", "version", "wait_ms"]): _rand_value(rng, depth + 1)
            for _ in range(rng.randrange(5))}


def _valid(rng: random.Random) -> bytes:
    """A frame that is well-formed, with real op names and plausible args."""
    op = rng.choice(OPS)
    args: Any
    r = rng.randrange(4)
    if r == 0:
        args = {"queue": "fuzz-q", "jobs": [[f"f{rng.randrange(10**6)}", "n",
                                             msgpack.packb(rng.randrange(100)), None]]}
    elif r == 1:
        args = {"items": [["fuzz-q", "x", rng.randrange(2**62), None]]}
    elif r == 2:
        args = {"move_id": "m", "term": 10**12, "slots": [0, 1]}
    else:
        args = _rand_value(rng)
    return encode_frame([rng.randrange(1, 2**31), op, args])


def _mutate(rng: random.Random, frame: bytes) -> bytes:
    b = bytearray(frame)
    kind = rng.randrange(5)
    if kind == 0 and len(b) > 4:  # flip bytes in the body (keep the length)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(4, len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 1:  # random body of a random small size
        body = os.urandom(rng.randrange(1, 200))
        return len(body).to_bytes(4, "big") + body
    if kind == 2:  # a valid msgpack value that is not a request
        return encode_frame(_rand_value(rng))
    if kind == 3 and len(b) > 6:  # truncated body, length fixed up
        body = b[4:rng.randrange(5, len(b))]
        return len(body).to_bytes(4, "big") + bytes(body)
    return bytes(b)


def _pool(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(POOL):
        f = _valid(rng)
        out.append(f if rng.random() < 0.3 else _mutate(rng, f))
    return out


class Fuzzer:
    def __init__(self, addr: str, pool: list[bytes], authed: bool, seed: int) -> None:
        self.host, _, port = addr.rpartition(":")
        self.port = int(port)
        self.pool = pool
        self.authed = authed
        self.rng = random.Random(seed)
        self.sent = 0
        self.reconnects = 0

    async def run(self, quota: int) -> None:
        while self.sent < quota:
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            self.reconnects += 1
            drain = asyncio.create_task(_discard(reader))
            try:
                if self.authed:
                    writer.write(encode_frame([1, "HELLO", {"version": 1, "token": TOKEN}]))
                while self.sent < quota and not drain.done():
                    # Before HELLO a connection gets few frames before it is
                    # refused; a batch per write keeps the broker busy.
                    n = 200 if self.authed else 8
                    start = self.rng.randrange(len(self.pool))
                    batch = [self.pool[(start + i) % len(self.pool)] for i in range(n)]
                    if self.rng.random() < 0.01:
                        batch.append(os.urandom(self.rng.randrange(1, 64)))  # garbage stream
                    writer.write(b"".join(batch))
                    self.sent += n
                    await asyncio.wait_for(writer.drain(), 10)
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
                drain.cancel()


async def _discard(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


async def _good_client(addr: str, fuzzing: threading.Event,
                       connected: threading.Event) -> dict[str, Any]:
    """Push jobs for as long as the fuzzers run, then let the worker finish them
    (in a thread of its own, so the fuzzers' loop does not slow it down)."""
    errors: list[str] = []
    done: collections.Counter[str] = collections.Counter()
    async with await shardq.connect(addr, TOKEN, connect_timeout=30,
                                    request_timeout=30) as client:
        q = client.queue("good")

        async def handle(job: shardq.Job) -> None:
            done[job.id] += 1

        worker = client.worker("good", handle, concurrency=32)
        task = asyncio.create_task(worker.run())
        await q.counts()  # connected before the fuzzers start
        connected.set()
        added = 0
        while fuzzing.is_set():
            try:
                await q.add_bulk([("n", {"i": added + i}, {"job_id": f"g{added + i}"})
                                  for i in range(200)])
                added += 200
            except shardq.ShardqError as exc:
                errors.append(repr(exc))
            await asyncio.sleep(0.01)
        deadline = time.monotonic() + 120
        while len(done) < added and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await worker.close()
        await task
        counts = await q.counts()
    return {"errors": errors, "added": added, "completed": len(done),
            "twice": sum(1 for v in done.values() if v > 1), "counts": counts}


async def main_async(args: argparse.Namespace) -> None:
    tmp = tempfile.mkdtemp(prefix="shardq-fuzz-")
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardq", "broker", "--id", "b1", "--port", "0",
         "--data-dir", tmp, "--token", TOKEN, "--control-token", "not-the-client-token"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        addr = line.split(" ", 1)[1]
        pool = _pool(args.seed)
        fuzzers = [Fuzzer(addr, pool, authed=i % 2 == 1, seed=args.seed + i)
                   for i in range(args.fuzzers)]
        fuzzing = threading.Event()
        fuzzing.set()
        results: list[dict[str, Any]] = []
        connected = threading.Event()
        good = threading.Thread(target=lambda: results.append(
            asyncio.run(_good_client(addr, fuzzing, connected))))
        good.start()
        if not await asyncio.to_thread(connected.wait, 60):
            raise SystemExit("the good client could not connect")
        t0 = time.monotonic()
        quota = args.frames // args.fuzzers
        await asyncio.gather(*(f.run(quota) for f in fuzzers))
        took = time.monotonic() - t0
        fuzzing.clear()
        await asyncio.to_thread(good.join, 300)
        result = results[0]
        sent = sum(f.sent for f in fuzzers)
        alive = proc.poll() is None
        peak = _peak_rss_kb(proc.pid) if alive else 0
        print(f"frames sent: {sent:,} in {took:.1f} s = {sent / took:,.0f} frames/s "
              f"({sum(f.reconnects for f in fuzzers):,} connections)")
        print(f"broker alive: {alive}; peak RSS {peak / 1024:.0f} MiB")
        lost = result["added"] - result["completed"]
        print(f"good client: {result['completed']:,}/{result['added']:,} jobs completed, "
              f"{lost} lost, {result['twice']} run twice, errors: {len(result['errors'])}"
              f"{' ' + str(result['errors'][:3]) if result['errors'] else ''}; "
              f"counts {result['counts']}")
        ok = alive and lost == 0 and not result["errors"] and result["twice"] == 0
        print("OK" if ok else "FAILED")
        if not ok:
            raise SystemExit(1)
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--fuzzers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
