"""`shardq bench ...`: benchmarks, peer comparisons, the broadcast scenario and plots.

The benchmarks live in the checkout's bench/ folder (they start servers, install peers and
plot with matplotlib, none of which belongs in the installed package); this module only
finds that folder and runs the right script with the options given. From an installed
wheel without a checkout it says so and exits 2. Results go to bench/results/ as JSON lines
(`--out` per command), and each script prints a summary table.
"""

from __future__ import annotations

import subprocess
import sys
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console

from shardq.cli import app

bench_app = typer.Typer(help="Benchmarks (run from a checkout): push, e2e, peers, scenario, "
                             "cpu, plots, all.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
err = Console(stderr=True)

ALL_SYSTEMS = ("shardq-durable,shardq-fast,shardq-node,bunqueue-memory,bunqueue-sqlite,"
               "bullmq-node-redis,"
               "bullmq-node-redis-aof,bullmq-py-redis,bullmq-py-redis-aof,echo-limit,"
               "sqlite-commit-limit")
RESULT_FILES = ("peers.jsonl", "cpu.jsonl", "scenario.jsonl")


class PushMode(StrEnum):
    """How `shardq bench push` adds jobs."""

    SINGLE = "single"  # one add at a time
    CONCURRENT = "concurrent"  # --concurrency adds in flight
    BULK = "bulk"  # add_bulk


def bench_dir() -> Path:
    """The checkout's bench/ folder, or exit 2 saying there is none."""
    here = Path(__file__).resolve().parents[2] / "bench"
    if (here / "bench_peers.py").is_file():
        return here
    err.print(f"[red]error:[/red] `shardq bench` runs from a checkout of shardq: no bench/ "
              f"folder at {here}. Clone the repository and run `make bench` (or "
              f"`.venv/bin/shardq bench ...`) there.", highlight=False)
    raise typer.Exit(2)


def run_script(name: str, args: list[str]) -> int:
    script = bench_dir() / name
    return subprocess.call([sys.executable, str(script), *args], cwd=script.parent.parent)


def _exit(code: int) -> None:
    if code:
        raise typer.Exit(code)


BROKERS_OPT = typer.Option(1, "--brokers", min=1, help="shardq brokers (rates are per broker).")
QUEUES_OPT = typer.Option(1, "--queues", min=1, help="Queues the jobs are spread over.")
CONC_OPT = typer.Option(100, "--concurrency", min=1,
                        help="Adds in flight (concurrent push) and worker concurrency (e2e).")
PAYLOAD_OPT = typer.Option(100, "--payload", min=0, help="Payload size in bytes.")
JOBS_OPT = typer.Option(100_000, "--jobs", min=1, help="At most this many jobs per workload.")
SECONDS_OPT = typer.Option(10.0, "--seconds", min=0.1, help="At most this long per workload.")
FAST_OPT = typer.Option(False, "--fast", help="shardq brokers answer before commit (--fast).")
PEERS_OPT = typer.Option(False, "--with-peers",
                         help="Run BullMQ+Redis and bunqueue side by side (installs them).")
OUT_OPT = typer.Option(None, "--out", help="JSON lines file (default bench/results/...).")


def _peers_args(workloads: str, brokers: int, queues: int, concurrency: int, payload: int,
                jobs: int, seconds: float, systems: str, out: Path | None) -> list[str]:
    args = ["--workloads", workloads, "--systems", systems, "--brokers", str(brokers),
            "--queues", str(queues), "--concurrency", str(concurrency), "--payload",
            str(payload), "--jobs", str(jobs), "--seconds", str(seconds)]
    return args + (["--out", str(out)] if out is not None else [])


@bench_app.command("push")
def push(mode: PushMode = typer.Option(PushMode.BULK, "--mode", help="single, concurrent, bulk."),
         brokers: int = BROKERS_OPT, queues: int = QUEUES_OPT, concurrency: int = CONC_OPT,
         payload: int = PAYLOAD_OPT, jobs: int = JOBS_OPT, seconds: float = SECONDS_OPT,
         fast: bool = FAST_OPT, with_peers: bool = PEERS_OPT, out: Path | None = OUT_OPT) -> None:
    """Push jobs: one at a time, --concurrency in flight, or add_bulk."""
    workload = {"single": "add_single", "concurrent": "add_concurrent", "bulk": "add_bulk"}
    systems = ALL_SYSTEMS if with_peers else ("shardq-fast" if fast else "shardq-durable")
    _exit(run_script("bench_peers.py", _peers_args(workload[mode.value], brokers, queues,
                                                   concurrency, payload, jobs, seconds,
                                                   systems, out)))


@bench_app.command("e2e")
def e2e(brokers: int = BROKERS_OPT, queues: int = QUEUES_OPT, concurrency: int = CONC_OPT,
        payload: int = PAYLOAD_OPT, jobs: int = JOBS_OPT, seconds: float = SECONDS_OPT,
        fast: bool = FAST_OPT, with_peers: bool = PEERS_OPT, out: Path | None = OUT_OPT) -> None:
    """Push with add_bulk while a worker pulls and acks; jobs/s from first push to last ack."""
    systems = ALL_SYSTEMS if with_peers else ("shardq-fast" if fast else "shardq-durable")
    _exit(run_script("bench_peers.py", _peers_args("e2e", brokers, queues, concurrency,
                                                   payload, jobs, seconds, systems, out)))


@bench_app.command("peers")
def peers(systems: str = typer.Option(ALL_SYSTEMS, "--systems", help="Comma-separated."),
          workloads: str = typer.Option("add_single,add_concurrent,add_bulk,e2e", "--workloads"),
          brokers: int = BROKERS_OPT, queues: int = QUEUES_OPT, concurrency: int = CONC_OPT,
          payload: int = PAYLOAD_OPT, jobs: int = JOBS_OPT, seconds: float = SECONDS_OPT,
          out: Path | None = OUT_OPT) -> None:
    """shardq side by side with BullMQ (Node and Python) on Redis and bunqueue, every workload.

    Peers are installed on first use (redis-server via apt-get, npm packages into
    bench/peers, pip bullmq into bench/peers/pyvenv); one that cannot be is skipped with
    the reason.
    """
    _exit(run_script("bench_peers.py", _peers_args(workloads, brokers, queues, concurrency,
                                                   payload, jobs, seconds, systems, out)))


@bench_app.command("scenario")
def scenario(messages: int = typer.Option(300_000, "-n", "--messages", min=1),
             tenants: int = typer.Option(50, "--tenants", min=1),
             brokers: int = typer.Option(3, "--brokers", min=1, help="Brokers at the start."),
             scale_out: int = typer.Option(1, "--scale-out", min=0,
                                           help="Brokers added mid-burst (0: none)."),
             scale_in: bool = typer.Option(True, "--scale-in/--no-scale-in",
                                           help="Remove them again after the burst."),
             latency_ms: float = typer.Option(1.0, "--latency-ms", min=0.0,
                                              help="Simulated handler latency."),
             concurrency: int = typer.Option(1000, "--concurrency", min=1),
             burst_seconds: float = typer.Option(10.0, "--burst-seconds", min=0.0,
                                                 help="Spread the pushes over this long."),
             fast: bool = FAST_OPT, out: Path | None = OUT_OPT) -> None:
    """The broadcast: N messages through contact->enrich->ai->send->save->webhook per tenant.

    Scales out mid-burst and back in after it; exits 1 unless every message ran every
    stage exactly once.
    """
    args = ["--messages", str(messages), "--tenants", str(tenants), "--brokers", str(brokers),
            "--scale-out", str(scale_out), "--latency-ms", str(latency_ms),
            "--concurrency", str(concurrency), "--burst-seconds", str(burst_seconds)]
    args += [] if scale_in else ["--no-scale-in"]
    args += ["--fast"] if fast else []
    args += ["--out", str(out)] if out is not None else []
    _exit(run_script("bench_scenario.py", args))


@bench_app.command("cpu")
def cpu(brokers: str = typer.Option("1,2,3,4", "--brokers", help="Broker counts to run."),
        jobs: int = typer.Option(100_000, "--jobs", min=1),
        queues: int = typer.Option(300, "--queues", min=1),
        fast: bool = FAST_OPT, out: Path | None = OUT_OPT) -> None:
    """Broker CPU-seconds per job for 1, 2, 3... brokers (should stay flat)."""
    args = ["--brokers", brokers, "--jobs", str(jobs), "--queues", str(queues)]
    args += ["--fast"] if fast else []
    args += ["--out", str(out)] if out is not None else []
    _exit(run_script("bench_cpu.py", args))


@bench_app.command("plots")
def plots(results: Path | None = typer.Option(None, "--results",
                                              help="Results folder (default bench/results).")
          ) -> None:
    """Draw the PNGs from the results files."""
    _exit(run_script("plots.py", ["--results", str(results)] if results is not None else []))


@bench_app.command("all")
def run_all(messages: int = typer.Option(300_000, "-n", "--messages", min=1,
                                         help="Broadcast scenario messages."),
            jobs: int = JOBS_OPT, seconds: float = SECONDS_OPT) -> None:
    """What `make bench` runs: peers side by side, CPU vs brokers, the scenario, the plots.

    Starts the three results files afresh.
    """
    results = bench_dir() / "results"
    results.mkdir(exist_ok=True)
    for name in RESULT_FILES:
        (results / name).unlink(missing_ok=True)
    codes = [
        run_script("bench_peers.py", ["--jobs", str(jobs), "--seconds", str(seconds)]),
        run_script("bench_cpu.py", []),
        run_script("bench_scenario.py", ["--messages", str(messages)]),
        run_script("plots.py", []),
    ]
    _exit(next((c for c in codes if c), 0))
