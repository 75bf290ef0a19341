"""The broadcast scenario: `shardq bench scenario`.

A burst of N messages (default 300k) enters a six-stage pipeline, one queue per stage per
tenant (`t007-contact`, `t007-enrich`, ... `t007-webhook`), sharded over T tenants (default
50, so 300 queues). Each stage's handler sleeps a simulated latency, records its execution
as (message, stage), and pushes the message to the next stage of the same tenant (job id
`{msg}:{stage}`, so a resend is idempotent). The local cluster (`shardq cluster up`, B
brokers, durable unless --fast) is scaled out by --scale-out brokers once half of the burst
was pushed (`shardq scale out`), and back in (`shardq scale in`) once the burst is pushed and
the scale out finished, while the pipeline is still draining.

Reported: time to drain (first push to the last webhook), stage executions per second over
time with the scale events, per-stage wait latency (enqueue to handler start) and the
whole-pipeline latency per message, broker CPU-seconds per stage execution, and the
exactly-once account: every message must show exactly one execution of each of the six
stages; a missing one is *lost*, a second one is *duplicated* (at-least-once delivery would
show a stall redelivery here as a duplicate, so the count is the honest check).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

import psutil
import uvloop
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import RESULTS, ROOT, Proc, Results, console, machine, progress

import shardq

STAGES = ["contact", "enrich", "ai", "send", "save", "webhook"]
SAMPLE_S = 0.5


def shardq_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "shardq", *args]


class Account:
    """Per stage, how many times each message ran it (a byte per message, saturating)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.runs = [bytearray(n) for _ in STAGES]
        self.wait_ms: list[array[float]] = [array("d") for _ in STAGES]
        self.pipeline_ms = array("d")
        self.born = array("d", bytes(8 * n))
        self.executions = 0
        self.finished = 0

    def record(self, m: int, stage: int, enqueued: float, now: float) -> None:
        runs = self.runs[stage]
        if runs[m] < 255:
            runs[m] += 1
        self.executions += 1
        self.wait_ms[stage].append((now - enqueued) * 1000)
        if stage == len(STAGES) - 1 and runs[m] == 1:
            self.finished += 1
            self.pipeline_ms.append((now - self.born[m]) * 1000)

    def verdict(self) -> dict[str, Any]:
        lost = dup = 0
        per_stage = {}
        for name, runs in zip(STAGES, self.runs, strict=True):
            zero = runs.count(0)
            once = runs.count(1)
            more = self.n - zero - once
            per_stage[name] = {"lost": zero, "duplicated": more}
            lost += zero
            dup += more
        return {"lost": lost, "duplicated": dup, "per_stage_account": per_stage,
                "exactly_once": lost == 0 and dup == 0}


def pct(xs: array[float] | list[float], p: float) -> float | None:
    if not len(xs):
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * p))]


class Scenario:
    def __init__(self, a: argparse.Namespace, data: Path) -> None:
        self.a = a
        self.data = data
        self.acct = Account(a.messages)
        self.events: list[dict[str, Any]] = []
        self.series: list[dict[str, Any]] = []
        self.cpu_by_pid: dict[int, float] = {}
        self.t0 = 0.0
        self.pushed = 0
        self.supervisor: Proc | None = None
        self.url = ""
        self.failed_jobs = 0

    # -- cluster ---------------------------------------------------------------
    def start_cluster(self) -> None:
        argv = shardq_cli("cluster", "up", "-n", str(self.a.brokers), "--data-dir",
                          str(self.data / "cluster"), "--base-port", "0",
                          "--coordinator-port", "0", *(["--fast"] if self.a.fast else []))
        # stdout goes to a file (cluster up keeps printing; a pipe nobody reads would fill)
        out_path = self.data / "cluster.out"
        with open(self.data / "cluster.log", "ab") as log, open(out_path, "wb") as out:
            p = subprocess.Popen(argv, stdout=out, stderr=log, cwd=ROOT, start_new_session=True)
        self.supervisor = Proc("cluster", p)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and p.poll() is None:
            ready = [ln for ln in out_path.read_text().splitlines() if ln.startswith("READY ")]
            if ready:
                self.url = ready[0].split(" ", 1)[1].strip()
                return
            time.sleep(0.1)
        raise SystemExit(f"cluster up did not print READY; see {self.data}")

    def broker_pids(self) -> list[int]:
        assert self.supervisor is not None
        try:
            kids = psutil.Process(self.supervisor.pid).children(recursive=True)
        except psutil.Error:
            return []
        out = []
        for k in kids:
            try:
                if " broker " in " ".join(k.cmdline()) + " ":
                    out.append(k.pid)
            except psutil.Error:
                pass
        return out

    def sample_cpu(self) -> None:
        for pid in self.broker_pids():
            try:
                t = psutil.Process(pid).cpu_times()
                self.cpu_by_pid[pid] = t.user + t.system
            except psutil.Error:
                pass

    async def scale(self, what: str, *args: str) -> None:
        start = time.perf_counter() - self.t0
        self.events.append({"t": start, "event": f"{what} start"})
        proc = await asyncio.create_subprocess_exec(
            *shardq_cli("scale", *args, "--data-dir", str(self.data / "cluster"),
                        "--coordinator", self.url, "--json"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT)
        _, err = await proc.communicate()
        end = time.perf_counter() - self.t0
        self.events.append({"t": end, "event": f"{what} done", "code": proc.returncode})
        if proc.returncode != 0:
            console.print(f"[red]scenario: {what} failed:[/red] {err.decode()[-600:]}")

    # -- workload --------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        a = self.a
        tenants = [f"t{i:03d}" for i in range(a.tenants)]
        names = [[f"{t}-{s}" for s in STAGES] for t in tenants]
        async with await shardq.connect(self.url) as client:
            queues = [[client.queue(n) for n in row] for row in names]
            latency = a.latency_ms / 1000
            acct = self.acct

            async def handle(job: shardq.Job) -> None:
                m, stage, tenant, enq = job.data
                acct.record(m, stage, enq, time.time())
                if latency:
                    await asyncio.sleep(latency)
                if stage + 1 < len(STAGES):
                    await queues[tenant][stage + 1].add(
                        "s", [m, stage + 1, tenant, time.time()], job_id=f"{m}:{stage + 1}",
                        attempts=3, backoff={"type": "fixed", "delay_ms": 100})

            worker = client.worker([n for row in names for n in row], handle,
                                   concurrency=a.concurrency)
            self.t0 = time.perf_counter()
            wtask = asyncio.ensure_future(worker.run())
            sampler = asyncio.ensure_future(self.sampler())
            scale_tasks: list[asyncio.Task[None]] = []
            with progress() as prog:
                ptask = prog.add_task("burst pushed", total=a.messages)
                dtask = prog.add_task("messages through all 6 stages", total=a.messages)
                xtask = prog.add_task("stage executions", total=a.messages * len(STAGES))
                push = asyncio.ensure_future(self.push(queues, scale_tasks))
                deadline = time.perf_counter() + a.timeout
                while acct.finished < a.messages and time.perf_counter() < deadline:
                    await asyncio.sleep(0.2)
                    prog.update(ptask, completed=self.pushed)
                    prog.update(dtask, completed=acct.finished)
                    prog.update(xtask, completed=acct.executions)
                    if push.done() and push.exception() is not None:
                        break
                drain_s = time.perf_counter() - self.t0
                prog.update(ptask, completed=self.pushed)
                prog.update(dtask, completed=acct.finished)
                prog.update(xtask, completed=acct.executions)
            await push
            await asyncio.gather(*scale_tasks)
            # anything still in flight (a late duplicate) gets a moment to show up
            await asyncio.sleep(1.0)
            await worker.close()
            await wtask
            sampler.cancel()
            self.sample_cpu()
            counts = await self.totals(client, [n for row in names for n in row])
        return self.report(drain_s, counts)

    async def push(self, queues: list[list[Any]], scale_tasks: list[asyncio.Task[None]]) -> None:
        a = self.a
        batch = 500
        per_s = a.messages / a.burst_seconds if a.burst_seconds > 0 else 0.0
        scaled_out = False
        tenant = 0
        for start in range(0, a.messages, batch):
            ids = range(start, min(start + batch, a.messages))
            now = time.time()
            for m in ids:
                self.acct.born[m] = now
            # a batch goes to one tenant; tenants take turns, so every queue gets its share
            await queues[tenant][0].add_bulk(
                [("s", [m, 0, tenant, now],
                  {"job_id": f"{m}:0", "attempts": 3,
                   "backoff": {"type": "fixed", "delay_ms": 100}}) for m in ids])
            tenant = (tenant + 1) % len(queues)
            self.pushed = ids[-1] + 1
            if not scaled_out and a.scale_out and self.pushed >= a.messages // 2:
                scaled_out = True
                scale_tasks.append(asyncio.ensure_future(
                    self.scale("scale out", "out", "-n", str(a.scale_out))))
            if per_s:
                ahead = self.pushed / per_s - (time.perf_counter() - self.t0)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        self.events.append({"t": time.perf_counter() - self.t0, "event": "burst pushed"})
        if scale_tasks and a.scale_in:
            await asyncio.gather(*scale_tasks)
            first_new = a.brokers + 1
            for i in range(first_new, first_new + a.scale_out):
                await self.scale(f"scale in b{i}", "in", "--broker", f"b{i}")

    async def sampler(self) -> None:
        last_x, last_f, last_t = 0, 0, 0.0
        while True:
            await asyncio.sleep(SAMPLE_S)
            t = time.perf_counter() - self.t0
            x, f = self.acct.executions, self.acct.finished
            dt = t - last_t
            self.series.append({"t": round(t, 3), "executions_per_s": (x - last_x) / dt,
                                "messages_done_per_s": (f - last_f) / dt,
                                "pushed": self.pushed, "brokers": len(self.broker_pids())})
            last_x, last_f, last_t = x, f, t
            await asyncio.to_thread(self.sample_cpu)

    async def totals(self, client: shardq.Client, names: list[str]) -> dict[str, int]:
        tot = {"waiting": 0, "active": 0, "delayed": 0, "failed": 0}
        for n in names:
            c = await client.queue(n).counts()
            for k in tot:
                tot[k] += int(c.get(k, 0))
        return tot

    def report(self, drain_s: float, counts: dict[str, int]) -> dict[str, Any]:
        a, acct = self.a, self.acct
        stage_lat = {s: {"p50_ms": pct(acct.wait_ms[i], .5), "p99_ms": pct(acct.wait_ms[i], .99)}
                     for i, s in enumerate(STAGES)}
        cpu = sum(self.cpu_by_pid.values())
        return {"bench": "scenario", "messages": a.messages, "tenants": a.tenants,
                "queues": a.tenants * len(STAGES), "stages": STAGES,
                "brokers_start": a.brokers, "scale_out": a.scale_out, "scale_in": a.scale_in,
                "mode": "fast" if a.fast else "durable", "latency_ms": a.latency_ms,
                "concurrency": a.concurrency, "drain_s": drain_s,
                "completed_all_stages": acct.finished, "stage_executions": acct.executions,
                "executions_per_s": acct.executions / drain_s,
                "messages_per_s": acct.finished / drain_s,
                "pipeline_p50_ms": pct(acct.pipeline_ms, .5),
                "pipeline_p99_ms": pct(acct.pipeline_ms, .99),
                "stage_wait": stage_lat, "broker_cpu_s": cpu,
                "broker_cpu_us_per_execution": cpu / max(acct.executions, 1) * 1e6,
                "left_in_queues": counts, **acct.verdict(),
                "events": self.events, "series": self.series}


def print_report(r: dict[str, Any]) -> None:
    ok = "[green]yes[/green]" if r["exactly_once"] else "[red]NO[/red]"
    console.print(
        f"\nbroadcast: {r['messages']:,} messages x 6 stages over {r['queues']} queues, "
        f"{r['brokers_start']} brokers +{r['scale_out']} mid-burst ({r['mode']}); "
        f"drained in {r['drain_s']:.1f}s ({r['executions_per_s']:,.0f} stage executions/s, "
        f"{r['messages_per_s']:,.0f} messages/s); pipeline p50/p99 "
        f"{(r['pipeline_p50_ms'] or 0) / 1000:.1f}/{(r['pipeline_p99_ms'] or 0) / 1000:.1f}s; "
        f"broker CPU {r['broker_cpu_us_per_execution']:.1f} us per stage execution")
    console.print(f"every message ran every stage exactly once: {ok} "
                  f"(lost {r['lost']}, duplicated {r['duplicated']}; left in queues "
                  f"{r['left_in_queues']})")
    t = Table(title="per stage", title_justify="left")
    for c in ("stage", "wait p50 ms", "wait p99 ms", "lost", "duplicated"):
        t.add_column(c, justify="right")
    for s in STAGES:
        w, acc = r["stage_wait"][s], r["per_stage_account"][s]
        t.add_row(s, f"{w['p50_ms'] or 0:,.1f}", f"{w['p99_ms'] or 0:,.1f}",
                  str(acc["lost"]), str(acc["duplicated"]))
    console.print(t)
    for e in r["events"]:
        console.print(f"  {e['t']:7.1f}s  {e['event']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--messages", type=int, default=300_000)
    ap.add_argument("--tenants", type=int, default=50)
    ap.add_argument("--brokers", type=int, default=3, help="brokers at the start")
    ap.add_argument("--scale-out", type=int, default=1, help="brokers added mid-burst (0: none)")
    ap.add_argument("--no-scale-in", dest="scale_in", action="store_false",
                    help="keep the added brokers after the burst")
    ap.add_argument("--latency-ms", type=float, default=1.0, help="simulated handler latency")
    ap.add_argument("--concurrency", type=int, default=1000, help="worker concurrency")
    ap.add_argument("--burst-seconds", type=float, default=10.0,
                    help="spread the burst's pushes over this long (0: as fast as possible)")
    ap.add_argument("--timeout", type=float, default=900.0, help="give up draining after this")
    ap.add_argument("--fast", action="store_true", help="brokers answer before commit")
    ap.add_argument("--out", type=Path, default=RESULTS / "scenario.jsonl")
    ap.add_argument("--json", action="store_true", help="print the report as JSON to stdout")
    a = ap.parse_args(argv)
    data = Path(tempfile.mkdtemp(prefix="bench-scenario-"))
    sc = Scenario(a, data)
    try:
        sc.start_cluster()
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            report = runner.run(sc.run())
    finally:
        if sc.supervisor is not None:
            sc.supervisor.stop(60)
        if os.environ.get("SHARDQ_BENCH_KEEP") != "1":
            shutil.rmtree(data, ignore_errors=True)
    report["machine"] = machine()
    Results(a.out).add(report)
    print_report(report)
    if a.json:
        print(json.dumps(report))
    return 0 if report["exactly_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
