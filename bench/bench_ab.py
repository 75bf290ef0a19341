"""A/B: the same workload against shardq from a git rev (A) and from this working tree (B).

    python bench/bench_ab.py --rev 9a824ff [--workloads add_single,add_concurrent,...]
                             [--rounds 5] [--seconds 4] [--fast] [--no-pin]

Each side gets its own import tree (a `git worktree` of the rev, or this checkout,
seen through a folder of symlinks laid out like the installed package), so the
broker, the coordinator and the client all come from that side; the driver
(bench/drivers/shardq_driver.py, public client API only) is the same file for both.
Rounds alternate A B A B ..., each on a fresh one-broker cluster, with the
servers pinned to CPU 0 and the client to CPU 1 where the box has two. Prints,
per workload, each side's median jobs/s and broker CPU-us per job and the
ratio B/A of the medians and pair by pair (the pairwise median is the figure to
quote on a shared, noisy machine), and the client process's CPU-us per job.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "bench" / "drivers" / "shardq_driver.py"
WORK = Path(tempfile.gettempdir()) / "shardq-ab"
PACKAGES = ("broker", "client", "router", "coordinator")
WORKLOADS = ("add_single", "add_concurrent", "add_bulk", "e2e")


def import_tree(src: Path, name: str) -> Path:
    """A folder whose `shardq/` is src's package layout (docs/design.md's
    package-dir mapping, as `make typecheck` builds it), plus a copy of the driver."""
    tree = WORK / name
    shutil.rmtree(tree, ignore_errors=True)
    pkg = tree / "shardq"
    pkg.mkdir(parents=True)
    for entry in (src / "shardq").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for d in PACKAGES:
        (pkg / d).symlink_to(src / d)
    drv = tree / "drv" / "x"
    drv.mkdir(parents=True)
    shutil.copy(DRIVER, drv / DRIVER.name)  # a copy: its parents[2] is `tree`
    return tree


def rev_tree(rev: str) -> Path:
    """A detached `git worktree` of `rev` (reused when it is already there)."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", rev], check=True,
                         capture_output=True, text=True).stdout.strip()
    src = WORK / f"src-{sha[:12]}"
    if not (src / "shardq").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(src), sha],
                       check=True, capture_output=True)
    return import_tree(src, f"A-{sha[:12]}")


class Cluster:
    """A coordinator and one broker started from `tree`, stopped by pid."""

    def __init__(self, tree: Path, fast: bool, cpus: set[int] | None) -> None:
        self.tree, self.data = tree, Path(tempfile.mkdtemp(prefix="ab-", dir=WORK))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.cpus = cpus
        try:
            coord = self._spawn(["coordinator", "--port", "0", "--expect", "1",
                                 "--data-dir", str(self.data / "coord")])
            self.url = f"http://{coord}"
            self.broker_addr = self._spawn(
                ["broker", "--id", "b1", "--port", "0", "--data-dir", str(self.data / "b1"),
                 "--coordinator", self.url, *(["--fast"] if fast else [])])
            self._wait_serving()
        except BaseException:
            self.stop()
            raise

    def _spawn(self, args: list[str]) -> str:
        log = open(self.data / f"{args[0]}.log", "ab")  # noqa: SIM115 - closed below
        try:
            p = subprocess.Popen([sys.executable, "-m", "shardq", *args], cwd=self.tree,
                                 stdout=subprocess.PIPE, stderr=log, start_new_session=True)
        finally:
            log.close()
        self.procs.append(p)
        if self.cpus:
            os.sched_setaffinity(p.pid, self.cpus)
        assert p.stdout is not None
        line = p.stdout.readline().decode().strip()
        if not line.startswith("READY "):
            raise RuntimeError(f"{args[0]} from {self.tree} did not start: {line!r}")
        return line.split(" ", 1)[1]

    def _wait_serving(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                topo = httpx.get(self.url + "/topology", timeout=5).json()
                if topo.get("epoch", 0) and topo.get("brokers"):
                    # the broker serves once it has the map: probe with the driver itself
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError("the cluster did not bootstrap in time")

    @property
    def broker_pid(self) -> int:
        return self.procs[1].pid

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            if p.stdout is not None:
                p.stdout.close()
        shutil.rmtree(self.data, ignore_errors=True)


def cpu_of(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def one_round(tree: Path, workload: str, a: argparse.Namespace, rnd: int) -> dict[str, float]:
    two = (os.cpu_count() or 1) >= 2 and not a.no_pin
    cluster = Cluster(tree, a.fast, {0} if two else None)
    try:
        cfg = {"target": cluster.url, "workload": workload, "jobs": a.jobs,
               "seconds": a.seconds, "payload": 100, "queues": 1, "prefix": f"ab{rnd}",
               "bulk": 1000, "bulk_inflight": 4, "concurrency": a.concurrency}
        argv = [sys.executable, str(tree / "drv" / "x" / DRIVER.name), json.dumps(cfg)]
        if two:
            argv = ["taskset", "-c", "1", *argv]
        c0 = cpu_of(cluster.broker_pid)
        k0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(argv, cwd=tree, capture_output=True, text=True,
                             timeout=a.seconds * 4 + 60)
        k1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the driver (reaped), only
        if a.settle:
            time.sleep(a.settle)  # the idle checkpoint (1 s after the last commit) counts too
        c1 = cpu_of(cluster.broker_pid)
    finally:
        cluster.stop()
    if out.returncode != 0:
        raise RuntimeError(f"driver failed ({tree}): {out.stderr[-2000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    client_s = (k1.ru_utime + k1.ru_stime) - (k0.ru_utime + k0.ru_stime)
    return {"rate": res["rate"], "cpu_us": (c1 - c0) / max(res["ops"], 1) * 1e6,
            "client_us": client_s / max(res["ops"], 1) * 1e6, "p50_ms": res["p50_ms"] or 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="9a824ff", help="side A (B is this working tree)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--jobs", type=int, default=200_000)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--fast", action="store_true", help="both sides with --fast")
    ap.add_argument("--no-pin", action="store_true", help="no CPU pinning")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="seconds to wait after each run before reading the broker's CPU "
                         "(e.g. 5: its idle checkpoint is counted)")
    ap.add_argument("--out", type=Path, help="append JSON lines here")
    a = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    sides = {"A": rev_tree(a.rev), "B": import_tree(ROOT, "B-worktree")}
    print(f"A = {a.rev}, B = working tree; {a.rounds} rounds of {a.seconds:g} s, alternating"
          f"{', --fast' if a.fast else ''}; load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for w in a.workloads.split(","):
        res: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
        for r in range(a.rounds):
            for side in ("AB" if r % 2 == 0 else "BA"):
                res[side].append(one_round(sides[side], w, a, r))
        ra = [x["rate"] for x in res["A"]]
        rb = [x["rate"] for x in res["B"]]
        ca = statistics.median(x["cpu_us"] for x in res["A"])
        cb = statistics.median(x["cpu_us"] for x in res["B"])
        ka = statistics.median(x["client_us"] for x in res["A"])
        kb = statistics.median(x["client_us"] for x in res["B"])
        pair = statistics.median(b / x for b, x in zip(rb, ra, strict=True))
        row = {"bench": "ab", "workload": w, "rev": a.rev, "fast": a.fast,
               "a_rate": statistics.median(ra), "b_rate": statistics.median(rb),
               "a_cpu_us": ca, "b_cpu_us": cb, "a_client_us": ka, "b_client_us": kb,
               "ratio_pairwise": pair, "settle_s": a.settle,
               "a_rates": ra, "b_rates": rb}
        rows.append(row)
        print(f"{w:15s} A {row['a_rate']:>9,.0f}/s broker {ca:6.1f} client {ka:5.1f} us/job | "
              f"B {row['b_rate']:>9,.0f}/s broker {cb:6.1f} client {kb:5.1f} us/job | B/A rate "
              f"x{row['b_rate'] / row['a_rate']:.2f} (pairwise x{pair:.2f}), broker cpu "
              f"x{cb / ca:.2f}, client cpu x{kb / ka:.2f}", flush=True)
        if a.out:
            with open(a.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
