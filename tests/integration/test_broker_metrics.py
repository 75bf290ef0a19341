"""A real broker's /metrics: the latency histograms are cumulative Prometheus
histograms (docs/design.md §10), checked with prometheus_client's parser and a
`histogram_quantile` computed from their buckets as Prometheus does."""

from __future__ import annotations

import asyncio
import math

import httpx
from prometheus_client.parser import text_string_to_metric_families

import shardq
from tests.aio import run, running, until

HISTOGRAMS = ("shardq_commit_seconds", "shardq_job_duration_seconds")
HANDLER_S = 0.03


def scrape(url: str) -> dict[str, list[tuple[float, float]]]:
    """Per histogram family: its `(le, cumulative count)` buckets in exposition
    order, with `+Inf` last; `_count` and `_sum` under `name:count` / `name:sum`."""
    text = httpx.get(url, timeout=10).text
    out: dict[str, list[tuple[float, float]]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name not in HISTOGRAMS:
            continue
        assert fam.type == "histogram"
        for s in fam.samples:
            assert s.labels.get("broker") == "b1"
            if s.name.endswith("_bucket"):
                out.setdefault(fam.name, []).append((float(s.labels["le"]), s.value))
            else:
                out[f"{fam.name}:{s.name.rsplit('_', 1)[1]}"] = [(0.0, s.value)]
    return out


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's `histogram_quantile`: linear within the bucket holding rank q."""
    total = buckets[-1][1]
    rank = q * total
    lower_le, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower_le  # the highest finite bound, as Prometheus answers
            return lower_le + (le - lower_le) * (rank - lower_count) / (count - lower_count)
        lower_le, lower_count = le, count
    raise AssertionError("a histogram's +Inf bucket holds every observation")


def check_cumulative(name: str, m: dict[str, list[tuple[float, float]]]) -> None:
    buckets = m[name]
    les = [le for le, _ in buckets]
    assert les == sorted(les) and math.isinf(les[-1])
    counts = [c for _, c in buckets]
    assert counts == sorted(counts), f"{name} buckets must be cumulative: {buckets}"
    assert counts[-1] == m[f"{name}:count"][0][1]


def test_histograms_are_cumulative_and_give_quantiles(start_broker) -> None:  # type: ignore[no-untyped-def]
    broker = start_broker("b1", "--metrics-port", "0")
    url = f"http://{broker.line_after_ready('METRICS ')}/metrics"
    n = 200

    async def work(queue: str) -> None:
        async with await shardq.connect(broker.addr) as client:
            q = client.queue(queue)
            await q.add_bulk([("n", i) for i in range(n)])

            async def handle(job: shardq.Job) -> None:
                await asyncio.sleep(HANDLER_S)  # the work being timed, not a wait

            worker = client.worker(queue, handle, concurrency=50, wait_ms=200)
            async with running(worker):
                await until(lambda: worker.completed >= n)

    run(work("first"))
    one = scrape(url)
    for name in HISTOGRAMS:
        check_cumulative(name, one)
    jobs = one["shardq_job_duration_seconds"]
    assert jobs[-1][1] == n
    # Every job ran its handler for 30 ms between its pull and its ack.
    assert dict(jobs)[0.025] == 0
    p50 = histogram_quantile(0.5, jobs)
    assert HANDLER_S - 0.005 <= p50 <= 10.0
    commits = one["shardq_commit_seconds"]
    assert commits[-1][1] > 0
    assert 0 < histogram_quantile(0.99, commits) <= 5.0
    assert one["shardq_commit_seconds:sum"][0][1] > 0

    run(work("second"))
    two = scrape(url)
    for name in HISTOGRAMS:
        check_cumulative(name, two)
        for (le1, c1), (le2, c2) in zip(one[name], two[name], strict=True):
            assert le1 == le2 and c2 >= c1, f"{name} le={le1} went down: {c1} -> {c2}"
    assert two["shardq_job_duration_seconds"][-1][1] == 2 * n
    assert two["shardq_commit_seconds"][-1][1] > commits[-1][1]
