"""Cluster benchmark: run from a checkout, `python bench/bench_cluster.py`.

For 1, 2 and 3 brokers (a coordinator with `--expect n` and n brokers, each
its own process, started by this script on free ports; durable mode unless
`--fast`), one client process (this one) pushes N jobs (default 200k) over
300 queues with `add_bulk`, then one worker in the same process drains them.
It reports, per broker count:

  * add jobs/s (push wall time) and end-to-end jobs/s (N / (push + drain));
  * CPU-seconds per job: the sum over every broker process of utime+stime
    (/proc/PID/stat, all threads) divided by N, for push, drain and both;
  * the client's CPU per job (this process, `time.process_time`), for push
    (packing + routing + fan-out) and drain (pull, handler, ack);
  * the router's own cost: ns per `Topology.route` on the live map.

Every figure is also printed as a ratio to the 1-broker run of the same
invocation: the machine is noisy, ratios travel better than absolutes.
With all processes on one box of few cores, aggregate throughput cannot
scale past what those cores give; what sharding must keep is CPU-seconds
per job flat as brokers are added. The ring balance tables of
bench/bench_ring.py come last. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import timeit
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_ring  # noqa: E402

import shardq  # noqa: E402
from shardq.codec import FrameDecoder, encode_frame  # noqa: E402
from shardq.router import Topology  # noqa: E402

PAYLOAD = {"to": "user@example.com", "body": "x" * 60}  # packs to ~100 bytes
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT_S = 30.0


# ----------------------------------------------------------------- processes
@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    addr: str

    def cpu_s(self) -> float:
        """utime + stime of the whole process (every thread), in seconds."""
        with open(f"/proc/{self.popen.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def spawn(name: str, args: list[str], log_dir: Path) -> Child:
    """Start `python -m shardq ARGS` and read its `READY host:port` line."""
    with open(log_dir / f"{name}.log", "ab") as log:
        p = subprocess.Popen([sys.executable, "-m", "shardq", *args], stdout=subprocess.PIPE,
                             stderr=log, cwd=ROOT, start_new_session=True)
    assert p.stdout is not None
    line = p.stdout.readline().decode().strip()
    if not line.startswith("READY "):
        p.kill()
        raise SystemExit(f"{name} did not start: {line!r}; see {log_dir / name}.log")
    return Child(name, p, line.split(" ", 1)[1])


@dataclass
class LocalCluster:
    coordinator: Child
    brokers: list[Child] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.coordinator.addr}"

    def broker_cpu_s(self) -> float:
        return sum(b.cpu_s() for b in self.brokers)

    def commits(self) -> int:
        """Group commits (one fsync each in durable mode) over every broker, from STATS."""
        return sum(int(raw_call(b.addr, "STATS", {})["commits"]) for b in self.brokers)

    def stop(self) -> None:
        for b in self.brokers:
            b.stop()
        self.coordinator.stop()


def start_cluster(n: int, data: Path, fast: bool) -> LocalCluster:
    logs = data / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    coord = spawn("coordinator", ["coordinator", "--port", "0", "--expect", str(n),
                                  "--data-dir", str(data / "coordinator")], logs)
    cluster = LocalCluster(coord)
    try:
        for i in range(1, n + 1):
            cluster.brokers.append(spawn(f"b{i}", [
                "broker", "--id", f"b{i}", "--port", "0", "--data-dir", str(data / f"b{i}"),
                "--coordinator", cluster.url, *(["--fast"] if fast else [])], logs))
        wait_synced(cluster, n)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def raw_call(addr: str, op: str, args: Any) -> Any:
    """One request straight to one broker over a fresh connection; the reply body."""
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        dec = FrameDecoder(64 * 1024 * 1024)
        s.sendall(encode_frame([1, "HELLO", {"version": 1}]) + encode_frame([2, op, args]))
        frames: list[Any] = []
        while not any(f[0] == 2 for f in frames):
            chunk = s.recv(1 << 16)
            if not chunk:
                raise ConnectionError(f"{addr} closed the connection")
            frames.extend(dec.feed(chunk))
    reply = next(f for f in frames if f[0] == 2)
    if reply[1] != "ok":
        raise RuntimeError(f"{op} to {addr}: {reply[1]} {reply[2]}")
    return reply[2]


def broker_epoch(addr: str) -> int:
    """The epoch of the map a broker serves with (0: none yet)."""
    body = raw_call(addr, "TOPOLOGY", {})
    return int(body["epoch"]) if body else 0


def wait_synced(cluster: LocalCluster, n: int) -> None:
    """Until every broker owns slots and serves with the coordinator's epoch."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            topo = Topology.from_dict(httpx.get(cluster.url + "/topology", timeout=5).json())
        except httpx.HTTPError:
            topo = None
        if topo is not None and sum(1 for c in topo.slot_counts().values() if c) == n \
                and all(broker_epoch(b.addr) == topo.epoch for b in cluster.brokers):
            return
        time.sleep(0.1)
    raise SystemExit("the cluster did not bootstrap in time")


# ----------------------------------------------------------------- workload
async def push(client: shardq.Client, queues: list[str], n: int, inflight: int) -> None:
    """`n` jobs spread evenly over `queues`, add_bulk of up to 1000, `inflight` calls at once."""
    per, extra = divmod(n, len(queues))
    calls = []
    for i, q in enumerate(queues):
        left = per + (1 if i < extra else 0)
        while left:
            k = min(1000, left)
            calls.append((q, k))
            left -= k
    sem = asyncio.Semaphore(inflight)

    async def one(q: str, k: int) -> None:
        async with sem:
            await client.queue(q).add_bulk([("j", PAYLOAD)] * k)

    await asyncio.gather(*(one(q, k) for q, k in calls))


async def drain(client: shardq.Client, queues: list[str], n: int, concurrency: int) -> int:
    done = 0
    finished = asyncio.Event()

    def handle(job: shardq.Job) -> None:
        nonlocal done
        done += 1
        if done >= n:
            finished.set()

    worker = client.worker(queues, handle, concurrency=concurrency)
    task = asyncio.ensure_future(worker.run())
    async with asyncio.timeout(900):
        await finished.wait()
    await worker.close()
    await task
    return done


def route_ns(topo: Topology, queues: list[str], repeat: int = 5) -> float:
    names = queues * max(1, 100_000 // len(queues))
    route = topo.route

    def loop() -> None:
        for q in names:
            route(q)

    return min(timeit.repeat(loop, number=1, repeat=repeat)) / len(names) * 1e9


async def measure(cluster: LocalCluster, n_brokers: int, a: argparse.Namespace) -> dict[str, Any]:
    queues = [f"bench-{i:03d}" for i in range(a.queues)]
    res: dict[str, Any] = {"brokers": n_brokers, "mode": "fast" if a.fast else "durable",
                           "jobs": a.jobs, "queues": a.queues}
    async with await shardq.connect(cluster.url) as client:
        topo = client.topology
        res["slots"] = {b: c for b, c in sorted(topo.slot_counts().items())}
        res["queues_per_broker"] = dict(sorted(Counter(topo.owner_of(q) for q in queues).items()))
        res["route_ns"] = route_ns(topo, queues)

        k0 = cluster.commits()
        b0, c0, t0 = cluster.broker_cpu_s(), time.process_time(), time.perf_counter()
        await push(client, queues, a.jobs, a.inflight)
        b1, c1, t1 = cluster.broker_cpu_s(), time.process_time(), time.perf_counter()
        k1 = cluster.commits()
        done = await drain(client, queues, a.jobs, a.concurrency)
        b2, c2, t2 = cluster.broker_cpu_s(), time.process_time(), time.perf_counter()
        k2 = cluster.commits()
    assert done == a.jobs, f"drained {done} of {a.jobs}"
    n = a.jobs
    res.update({
        "push_s": t1 - t0, "drain_s": t2 - t1,
        "add_jobs_per_s": n / (t1 - t0),
        "drain_jobs_per_s": n / (t2 - t1),
        "e2e_jobs_per_s": n / (t2 - t0),
        "broker_cpu_us_per_job_push": (b1 - b0) / n * 1e6,
        "broker_cpu_us_per_job_drain": (b2 - b1) / n * 1e6,
        "broker_cpu_us_per_job": (b2 - b0) / n * 1e6,
        "client_cpu_us_per_job_push": (c1 - c0) / n * 1e6,
        "client_cpu_us_per_job_drain": (c2 - c1) / n * 1e6,
        "client_cpu_us_per_job": (c2 - c0) / n * 1e6,
        "jobs_per_commit_push": n / max(k1 - k0, 1),
        "jobs_per_commit_drain": n / max(k2 - k1, 1),
        "coordinator_cpu_s": cluster.coordinator.cpu_s(),
    })
    return res


# ----------------------------------------------------------------- report
ROWS = [
    # (label, key, format, higher is better)
    ("add jobs/s (add_bulk, push phase)", "add_jobs_per_s", "{:,.0f}", True),
    ("drain jobs/s (worker)", "drain_jobs_per_s", "{:,.0f}", True),
    ("end-to-end jobs/s (N / push+drain)", "e2e_jobs_per_s", "{:,.0f}", True),
    ("broker CPU us/job, push", "broker_cpu_us_per_job_push", "{:.1f}", False),
    ("broker CPU us/job, drain", "broker_cpu_us_per_job_drain", "{:.1f}", False),
    ("broker CPU us/job, total", "broker_cpu_us_per_job", "{:.1f}", False),
    ("client CPU us/job, push (routing)", "client_cpu_us_per_job_push", "{:.1f}", False),
    ("client CPU us/job, drain", "client_cpu_us_per_job_drain", "{:.1f}", False),
    ("client CPU us/job, total", "client_cpu_us_per_job", "{:.1f}", False),
    ("Topology.route ns/call (live map)", "route_ns", "{:.0f}", False),
    ("jobs per group commit, push", "jobs_per_commit_push", "{:.0f}", True),
    ("jobs per group commit, drain", "jobs_per_commit_drain", "{:.0f}", True),
]


def print_table(results: list[dict[str, Any]]) -> None:
    base = results[0]
    width = 24
    head = f"{'':38}" + "".join(f"{str(r['brokers']) + ' broker(s)':>{width}}" for r in results)
    print(head)
    for label, key, fmt, _ in ROWS:
        cells = []
        for r in results:
            ratio = r[key] / base[key] if base[key] else float("nan")
            cells.append(f"{fmt.format(r[key])} ({ratio:.2f}x)".rjust(width))
        print(f"{label:38}" + "".join(cells))
    print(f"{'slots per broker':38}" + "".join(
        " ".join(str(c) for c in r["slots"].values()).rjust(width) for r in results))
    print(f"{'queues per broker (of ' + str(base['queues']) + ')':38}" + "".join(
        " ".join(str(c) for c in r["queues_per_broker"].values()).rjust(width) for r in results))
    print(f"{'push s / drain s':38}" + "".join(
        f"{r['push_s']:.1f} / {r['drain_s']:.1f}".rjust(width) for r in results))
    print(f"(ratios are to the {base['brokers']}-broker run of this invocation; "
          "for CPU per job, 1.00x = flat)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--jobs", type=int, default=200_000, help="jobs per run")
    ap.add_argument("--queues", type=int, default=300)
    ap.add_argument("--brokers", default="1,2,3", help="broker counts to run, first is the base")
    ap.add_argument("--fast", action="store_true", help="brokers answer before commit (--fast)")
    ap.add_argument("--inflight", type=int, default=8, help="add_bulk calls in flight")
    ap.add_argument("--concurrency", type=int, default=256, help="worker concurrency")
    ap.add_argument("--json", action="store_true", help="print JSON lines only")
    a = ap.parse_args()
    counts = [int(x) for x in a.brokers.split(",")]

    cores = os.cpu_count() or 1
    if not a.json:
        print(f"machine: {cores} cores, python {sys.version.split()[0]}; the client, the "
              "coordinator and every broker share this box.")
        print(f"With {cores} cores, aggregate throughput cannot scale beyond what {cores} cores "
              "give, however many brokers run: the point here is CPU-seconds per job staying "
              "flat as brokers are added (and the client's routing cost with them).")
        print(f"{a.jobs:,} jobs over {a.queues} queues per run, "
              f"{'fast' if a.fast else 'durable'} mode, add_bulk <= 1000 x {a.inflight} in "
              f"flight, one worker (concurrency {a.concurrency}); one client process.\n")

    results = []
    for n in counts:
        data = Path(tempfile.mkdtemp(prefix=f"bench-cluster-{n}-"))
        try:
            cluster = start_cluster(n, data, a.fast)
            try:
                with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                    res = runner.run(measure(cluster, n, a))
            finally:
                cluster.stop()
        finally:
            shutil.rmtree(data, ignore_errors=True)
        results.append(res)
        if not a.json:
            print(f"  {n} broker(s): push {res['push_s']:.1f}s, drain {res['drain_s']:.1f}s",
                  flush=True)

    base = results[0]
    for r in results:
        r["ratio_to_base"] = {key: r[key] / base[key] for _, key, _, _ in ROWS if base[key]}
    if not a.json:
        print()
        print_table(results)
        if 1 in counts and 3 in counts:
            one, three = (next(r for r in results if r["brokers"] == k) for k in (1, 3))
            c1, c3 = one["client_cpu_us_per_job_push"], three["client_cpu_us_per_job_push"]
            print(f"\nrouter cost, 3 brokers vs 1: client CPU per pushed job {c3:.1f} vs "
                  f"{c1:.1f} us ({c3 / c1:.2f}x); Topology.route {three['route_ns']:.0f} vs "
                  f"{one['route_ns']:.0f} ns/call")
        print()
        bench_ring.balance_table()
        bench_ring.movement_table()
    for r in results:
        print(json.dumps({"bench": "cluster", **r}))


if __name__ == "__main__":
    main()
