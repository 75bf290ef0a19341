"""Cluster stats end to end (docs/design.md §6, §8, §10): `cluster up -n 3`, real jobs,
the coordinator's GET /metrics and GET /stats, and `shardq stats` through CliRunner.

The coordinator aggregates the brokers' heartbeat stats (about one a
second), so every check first waits, bounded, for a heartbeat that carries
the work.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

import shardq
from shardq.cli import app
from shardq.router import Topology
from tests.aio import run

from ..conftest import Proc
from .conftest import BROKERS, http_get, poll, synced_topology

pytestmark = pytest.mark.slow

JOBS = 10_000
QUEUES = [f"stats-{i:02d}" for i in range(40)]  # 250 jobs each
WIDE = {"COLUMNS": "200"}  # rich tables at full width under CliRunner



async def add_and_work(url: str, queues: list[str], per_queue: int) -> int:
    """Add `per_queue` jobs to each queue, then work them all; returns the acks accepted."""
    total = len(queues) * per_queue
    done = asyncio.Event()
    calls = 0

    def handle(job: shardq.Job) -> None:
        nonlocal calls
        calls += 1
        if calls >= total:
            done.set()

    async with await shardq.connect(url) as client:
        await asyncio.gather(*(client.queue(q).add_bulk([("job", n) for n in range(per_queue)])
                               for q in queues))
        worker = client.worker(queues, handle, concurrency=200)
        running = asyncio.create_task(worker.run())
        await done.wait()
        await worker.close()
        await running
        return int(worker.completed)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(name, sorted labels) -> value; parsing fails the test on invalid text."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def per_broker(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str
               ) -> dict[str, float]:
    """broker -> the sum of `name` over its queues."""
    out: dict[str, float] = {}
    for (n, labels), v in m.items():
        if n == name:
            b = dict(labels)["broker"]
            out[b] = out.get(b, 0) + v
    return out


def test_10k_completed_jobs_show_in_metrics_from_every_broker_and_in_the_cluster_total(
        cluster: Proc) -> None:
    url = cluster.addr
    topo = synced_topology(url)
    assert {topo.owner_of(q) for q in QUEUES} == set(BROKERS), "the work spans every broker"

    acked = run(add_and_work(url, QUEUES, JOBS // len(QUEUES)))
    assert acked == JOBS

    def heartbeat_carried_it() -> dict[str, Any] | None:
        s = http_get(url, "/stats")
        return s if s and s["totals"]["completed_total"] == JOBS else None

    stats = poll(heartbeat_carried_it, "a heartbeat with every completion")
    m = samples(httpx.get(url + "/metrics", timeout=5.0).text)

    completed = per_broker(m, "shardq_jobs_completed_total")
    added = per_broker(m, "shardq_jobs_added_total")
    assert set(completed) == set(BROKERS), "series from every broker"
    assert all(v > 0 for v in completed.values())
    assert m[("shardq_cluster_jobs_completed_total", ())] == sum(completed.values()) == JOBS
    assert m[("shardq_cluster_jobs_added_total", ())] == sum(added.values()) == JOBS
    assert m[("shardq_cluster_jobs_failed_total", ())] == 0
    for b in BROKERS:
        assert m[("shardq_broker_up", (("broker", b),))] == 1

    # GET /stats agrees, broker by broker and queue by queue.
    assert stats["epoch"] == Topology.from_dict(http_get(url, "/topology")).epoch
    totals = stats["totals"]
    assert (totals["added_total"], totals["completed_total"], totals["failed_total"]) == (
        JOBS, JOBS, 0)
    assert (totals["waiting"], totals["active"], totals["delayed"]) == (0, 0, 0)
    # Brokers report the p99 of each queue's recent start-to-ack durations.
    assert isinstance(totals["p99_ms"], (int, float)) and totals["p99_ms"] >= 0
    for b in BROKERS:
        entry = stats["brokers"][b]
        assert entry["state"] == "active"
        assert entry["totals"]["completed_total"] == completed[b]
        mine = {q for q in QUEUES if topo.owner_of(q) == b}
        assert mine <= set(entry["queues"])
        for q in mine:
            assert entry["queues"][q]["completed_total"] == JOBS // len(QUEUES)
            assert m[("shardq_queue_jobs", (("broker", b), ("queue", q),
                                            ("state", "completed")))] == JOBS // len(QUEUES)


class Load:
    """Adds and works jobs on a few queues in a thread of its own until `stop()`."""

    def __init__(self, url: str, queues: list[str]) -> None:
        self.url = url
        self.queues = queues
        self.done = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the load did not stop"
        if self.error is not None and exc[0] is None:
            raise self.error

    def _run(self) -> None:
        try:
            run(self._main(), timeout=240.0)
        except BaseException as e:
            self.error = e

    async def _main(self) -> None:
        def handle(job: shardq.Job) -> None:
            self.done += 1

        async with await shardq.connect(self.url) as client:
            worker = client.worker(self.queues, handle, concurrency=50)
            running = asyncio.create_task(worker.run())
            while not self._stop.is_set():
                await asyncio.gather(*(client.queue(q).add_bulk([("job", n) for n in range(20)])
                                       for q in self.queues))
                await asyncio.sleep(0.05)
            await worker.close()
            await running


@pytest.fixture
def load(cluster: Proc) -> Iterator[Load]:
    synced_topology(cluster.addr)
    with Load(cluster.addr, [f"load-{i}" for i in range(6)]) as running:
        yield running


def test_shardq_stats_json_shows_live_throughput_while_a_load_runs(
        cluster: Proc, load: Load) -> None:
    runner = CliRunner()

    def busy() -> dict[str, Any] | None:
        result = runner.invoke(app, ["stats", "--json", "--coordinator", cluster.addr])
        assert result.exit_code == 0, result.output
        data: dict[str, Any] = json.loads(result.stdout)
        t = data["totals"]
        return data if t["added_per_s"] > 0 and t["completed_per_s"] > 0 else None

    data = poll(busy, "non-zero cluster rates in `shardq stats --json`")
    assert set(data) == {"epoch", "brokers", "totals"}
    assert set(data["brokers"]) == set(BROKERS)
    shown = {q for b in data["brokers"].values() for q in b["queues"]}
    assert {q for q in shown if q.startswith("load-")} <= set(load.queues)
    assert load.done > 0


def test_shardq_stats_watch_refreshes_count_times_while_a_load_runs(
        cluster: Proc, load: Load) -> None:
    def load_seen() -> bool:
        s = http_get(cluster.addr, "/stats")
        return bool(s) and any(q.startswith("load-") and e["completed_total"] > 0
                               for b in s["brokers"].values() for q, e in b["queues"].items())

    poll(load_seen, "a heartbeat that carries the load")
    runner = CliRunner()
    result = runner.invoke(app, ["stats", "--watch", "--count", "2", "--interval", "0.5",
                                 "--coordinator", cluster.addr], env=WIDE)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.count("busiest queues") == 2, "not a terminal: every refresh is printed"
    assert "completed/s" in out
    for b in BROKERS:
        assert b in out
    assert "load-" in out

    result = runner.invoke(app, ["stats", "--watch", "--json", "--count", "2", "--interval",
                                 "0.2", "--coordinator", cluster.addr])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 2
    assert all(set(d) == {"epoch", "brokers", "totals"} for d in lines)


def test_shardq_stats_against_no_coordinator_is_one_error_line() -> None:
    result = CliRunner().invoke(app, ["stats", "--coordinator", "http://127.0.0.1:9"])
    assert result.exit_code == 1
    assert "cannot reach the coordinator" in result.output
