"""The benchmark plots (PNG, matplotlib) from the results files: `shardq bench plots`.

  scenario_throughput.png  stage executions/s and messages/s over time, scale events marked
  peers_bars.png           jobs/s per broker, shardq vs each peer, per workload
  cpu_per_job.png          broker CPU-us per job vs number of brokers

Each file in bench/results/ may hold several runs; a run starts with its `machine` line
(scenario lines carry their own), and the last run is plotted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import RESULTS, console

COLORS = {"shardq-durable": "#1f77b4", "shardq-fast": "#6baed6", "bunqueue-memory": "#ff7f0e",
          "bunqueue-sqlite": "#fdae6b", "bullmq-node-redis": "#2ca02c",
          "bullmq-node-redis-aof": "#98df8a", "bullmq-py-redis": "#d62728",
          "bullmq-py-redis-aof": "#ff9896"}


def last_run(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    starts = [i for i, r in enumerate(rows) if r.get("bench") == "machine"]
    return rows[starts[-1]:] if starts else rows


def scenario_plot(rows: list[dict[str, Any]], out: Path) -> bool:
    sc = [r for r in rows if r.get("bench") == "scenario"]
    if not sc:
        return False
    r = sc[-1]
    t = [p["t"] for p in r["series"]]
    fig, ax = plt.subplots(figsize=(10, 5))
    ax.plot(t, [p["executions_per_s"] for p in r["series"]], label="stage executions/s")
    ax.plot(t, [p["messages_done_per_s"] for p in r["series"]],
            label="messages through all 6 stages/s")
    ax2 = ax.twinx()
    ax2.step(t, [p["brokers"] for p in r["series"]], where="post", color="gray", alpha=.5,
             label="brokers")
    ax2.set_ylabel("brokers")
    ax2.set_ylim(0, max(p["brokers"] for p in r["series"]) + 2)
    for i, e in enumerate(r["events"]):
        style = "--" if "start" in e["event"] else ":"
        ax.axvline(e["t"], color="black", linestyle=style, alpha=.6)
        ax.text(e["t"], ax.get_ylim()[1] * (.95 - .3 * (i % 3)), " " + e["event"],
                rotation=90, va="top", fontsize=8)
    ax.set_xlabel("seconds since the burst started")
    ax.set_ylabel("per second")
    ok = "exactly once: yes" if r["exactly_once"] else \
        f"LOST {r['lost']} / DUPLICATED {r['duplicated']}"
    ax.set_title(f"broadcast: {r['messages']:,} messages x 6 stages, {r['queues']} queues, "
                 f"{r['brokers_start']}+{r['scale_out']} brokers ({r['mode']}); drained in "
                 f"{r['drain_s']:.0f}s; {ok}", fontsize=10)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def peers_plot(rows: list[dict[str, Any]], out: Path) -> bool:
    pr = [r for r in rows if r.get("bench") == "peers"]
    if not pr:
        return False
    systems = list(dict.fromkeys(r["system"] for r in pr))
    workloads = list(dict.fromkeys(r["workload"] for r in pr))
    by = {(r["system"], r["workload"]): r["rate_per_broker"] for r in pr}
    fig, ax = plt.subplots(figsize=(11, 5))
    width = .8 / len(systems)
    for i, s in enumerate(systems):
        xs = [j + i * width for j in range(len(workloads))]
        ys = [by.get((s, w), 0) for w in workloads]
        ax.bar(xs, ys, width, label=s, color=COLORS.get(s))
    ax.set_xticks([j + .4 - width / 2 for j in range(len(workloads))], workloads)
    ax.set_yscale("log")
    ax.set_ylabel("jobs/s per broker (log scale)")
    ax.set_title("shardq (1 broker) vs BullMQ+Redis and bunqueue: same workload, payload and "
                 "concurrency", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=.3, which="both")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def cpu_plot(rows: list[dict[str, Any]], out: Path) -> bool:
    cr = [r for r in rows if r.get("bench") == "cpu"]
    if not cr:
        return False
    b = [r["brokers"] for r in cr]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("broker_cpu_us_per_job", "total (push + drain)"),
                       ("broker_cpu_us_per_job_push", "push (add_bulk)"),
                       ("broker_cpu_us_per_job_drain", "drain (pull + ack)")):
        ax.plot(b, [r[key] for r in cr], marker="o", label=label)
    ax.set_xticks(b)
    ax.set_xlabel("brokers")
    ax.set_ylabel("broker CPU-us per job (all brokers)")
    ax.set_ylim(0, max(r["broker_cpu_us_per_job"] for r in cr) * 1.3)
    ax.set_title(f"CPU per job vs brokers ({cr[0]['jobs']:,} jobs, {cr[0]['queues']} queues, "
                 f"{cr[0]['mode']})", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    d = a.results
    made = []
    if scenario_plot(last_run(d / "scenario.jsonl"), d / "scenario_throughput.png"):
        made.append("scenario_throughput.png")
    if peers_plot(last_run(d / "peers.jsonl"), d / "peers_bars.png"):
        made.append("peers_bars.png")
    if cpu_plot(last_run(d / "cpu.jsonl"), d / "cpu_per_job.png"):
        made.append("cpu_per_job.png")
    console.print(f"plots in {d}: {', '.join(made) or 'none (no results yet)'}")


if __name__ == "__main__":
    main()
