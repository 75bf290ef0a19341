"""`shardq demo`: start a local 3-broker cluster, push and work jobs, show where they went.

This is what `make run` starts. The cluster keeps running after the demo
until Ctrl-C, so `shardq status` / `shardq owner` can be tried against it.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from shardq.cli import app


@app.command("demo")
def demo(
    n: int = typer.Option(3, "-n", "--brokers", min=1, help="Brokers in the local cluster."),
    jobs: int = typer.Option(20_000, help="Jobs to push."),
    queues: int = typer.Option(60, help="Queues to spread them over."),
    data_dir: Path = typer.Option(Path("shardq-data"), help="Cluster data directory."),
    coordinator_port: int = typer.Option(7070, min=0),
    base_port: int = typer.Option(7101, min=0),
    keep_running: bool = typer.Option(True, help="Leave the cluster up until Ctrl-C."),
) -> None:
    """Run a local cluster with a short demo workload."""
    console = Console()
    cmd = [sys.executable, "-m", "shardq", "cluster", "up", "-n", str(n),
           "--data-dir", str(data_dir), "--coordinator-port", str(coordinator_port),
           "--base-port", str(base_port), "--ui-actions"]
    console.print(f"[bold]starting[/bold] {' '.join(cmd[2:])}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, start_new_session=True)
    try:
        url = _wait_ready(proc)
        console.print(f"cluster ready: coordinator at [cyan]{url}[/cyan]")
        console.print(f"dashboard: [bold cyan]{url}/ui[/bold cyan] (actions on; local demo)")
        asyncio.run(_workload(url, jobs, queues, console))
        if keep_running:
            console.print(f"\nThe cluster keeps running. Try: [bold]shardq status[/bold], "
                          f"[bold]shardq owner demo-7[/bold] (coordinator {url}), or open the "
                          f"dashboard at [bold cyan]{url}/ui[/bold cyan]. Ctrl-C stops it.")
            proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _wait_ready(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode().strip()
        if line.startswith("READY "):
            return line.split(" ", 1)[1]
    typer.echo(f"the cluster did not start (exit code {proc.wait()}); see its logs", err=True)
    raise typer.Exit(1)


async def _workload(url: str, n_jobs: int, n_queues: int, console: Console) -> None:
    import shardq

    names = [f"demo-{i}" for i in range(n_queues)]
    handled: collections.Counter[str] = collections.Counter()
    done = asyncio.Event()
    finished = 0

    async def handle(job: Any) -> dict[str, Any]:
        nonlocal finished
        handled[job.queue] += 1
        if job.data["n"] % 97 == 0 and job.attempts_made == 0:
            raise RuntimeError("flaky downstream (first try fails, the retry succeeds)")
        finished += 1
        if finished >= n_jobs:
            done.set()
        return {"ok": job.data["n"]}

    async with await shardq.connect(url) as client:
        t0 = time.perf_counter()
        per_queue = n_jobs // n_queues
        await asyncio.gather(*(
            client.queue(q).add_bulk([("demo", {"n": i * per_queue + k}, {"attempts": 2})
                                      for k in range(per_queue)])
            for i, q in enumerate(names)))
        n_jobs = per_queue * n_queues
        pushed_s = time.perf_counter() - t0
        console.print(f"pushed {n_jobs:,} jobs over {n_queues} queues in {pushed_s:.2f}s "
                      f"({n_jobs / pushed_s:,.0f} jobs/s, each answered after fsync)")
        worker = client.worker(names, handle, concurrency=100)
        t1 = time.perf_counter()
        task = asyncio.create_task(worker.run())
        async with asyncio.timeout(300):
            await done.wait()
        await worker.close()
        await task
        work_s = time.perf_counter() - t1
        console.print(f"worked {n_jobs:,} jobs in {work_s:.2f}s ({n_jobs / work_s:,.0f} jobs/s); "
                      f"{sum(handled.values()) - n_jobs} retries of flaky jobs")
        topo = client.topology
        per_broker: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
        for q in names:
            routed = topo.route(q)
            owner = routed[0] if routed else "?"
            counts = await client.queue(q).counts()
            per_broker[owner][0] += 1
            per_broker[owner][1] += counts["completed"]
            per_broker[owner][2] += counts["failed"]
        table = Table(title=f"where the demo's jobs ran (epoch {topo.epoch})")
        for col in ("broker", "addr", "slots", "queues", "completed", "failed"):
            table.add_column(col, justify="right" if col not in ("broker", "addr") else "left")
        slot_counts = topo.slot_counts()
        for bid in sorted(per_broker):
            row = per_broker[bid]
            table.add_row(bid, topo.addr_of(bid) or "?", str(slot_counts.get(bid, 0)),
                          str(row[0]), f"{row[1]:,}", f"{row[2]:,}")
        console.print(table)
