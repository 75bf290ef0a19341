"""Prometheus metrics of one broker (docs/design.md §10), served on --metrics-port.

A custom collector reads the broker's own counters at scrape time, so the
hot path only bumps plain ints; the scrape runs on the broker's event loop
(uvicorn + prometheus_client's ASGI app), never racing the queues.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, make_asgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from shardq.broker.engine import Broker

log = logging.getLogger("shardq.broker.metrics")

DURATION_BUCKETS_MS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)
COUNTERS = (("added", "jobs_added"), ("completed", "jobs_completed"), ("failed", "jobs_failed"),
            ("retried", "jobs_retried"), ("stalled", "jobs_stalled"))


class BrokerCollector(Collector):
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def collect(self) -> Iterator[Metric]:
        b = self.broker
        bid = b.config.broker_id
        owned = [q for q in b.queues.values() if b.owned[q.slot]]
        for key, name in COUNTERS:
            fam = CounterMetricFamily(f"shardq_{name}", f"Jobs {key}, running total",
                                      labels=["broker", "queue"])
            for q in owned:
                fam.add_metric([bid, q.name], q.counters[key])
            yield fam
        depth = GaugeMetricFamily("shardq_queue_jobs", "Jobs retained per state",
                                  labels=["broker", "queue", "state"])
        for q in owned:
            for state, n in q.counts().items():
                if state != "paused":
                    depth.add_metric([bid, q.name, state], n)
        yield depth
        yield _histogram("shardq_job_duration_seconds", "Time from start to ack", bid,
                         [d for q in owned for d in q.durations_ms])
        st = b.store
        commit = HistogramMetricFamily("shardq_commit_seconds", "Group commit duration",
                                       labels=["broker"])
        commit.add_metric([bid], buckets=[("+Inf", st.commits)], sum_value=st.commit_seconds)
        yield commit
        handoffs = CounterMetricFamily("shardq_handoffs_total", "Slot handoffs",
                                       labels=["broker", "result"])
        for result, n in b.handoffs.items():
            handoffs.add_metric([bid, result], n)
        yield handoffs
        for name, value, doc in (
                ("shardq_broker_slots", sum(b.owned), "Slots owned"),
                ("shardq_broker_jobs", b.total_jobs, "Jobs held in memory"),
                ("shardq_broker_rss_bytes", b.rss, "Resident memory"),
                ("shardq_topology_epoch", b.epoch, "Topology epoch")):
            g = GaugeMetricFamily(name, doc, labels=["broker"])
            g.add_metric([bid], value)
            yield g


def _histogram(name: str, doc: str, bid: str, samples_ms: list[int]) -> HistogramMetricFamily:
    """A histogram of the most recent durations (a sliding sample per queue)."""
    fam = HistogramMetricFamily(name, doc + " (recent sample)", labels=["broker"])
    buckets = []
    for edge in DURATION_BUCKETS_MS:
        buckets.append((str(edge / 1000), sum(1 for d in samples_ms if d <= edge)))
    buckets.append(("+Inf", len(samples_ms)))
    fam.add_metric([bid], buckets=buckets, sum_value=sum(samples_ms) / 1000)
    return fam


def registry_for(broker: Broker) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(BrokerCollector(broker))
    return reg


def start_metrics_server(broker: Broker, host: str, port: int) -> asyncio.Task[None]:
    """Serve /metrics on the running loop; returns the server task."""
    import uvicorn

    app = make_asgi_app(registry_for(broker))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                            loop="none")
    server = uvicorn.Server(config)
    return asyncio.get_running_loop().create_task(server.serve())
