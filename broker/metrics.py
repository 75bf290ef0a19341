"""Prometheus metrics of one broker (docs/design.md §10), served on --metrics-port.

A custom collector reads the broker's own counters at scrape time, so the
hot path only bumps plain ints; the scrape runs on the broker's event loop
(uvicorn + prometheus_client's ASGI app), never racing the queues.
"""

from __future__ import annotations

import asyncio
import logging
import socket
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

from shardq.broker.histogram import Buckets

if TYPE_CHECKING:
    from shardq.broker.engine import Broker

log = logging.getLogger("shardq.broker.metrics")

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
        yield _histogram("shardq_job_duration_seconds", "Time from a job's start to its ack",
                         bid, b.defaults.durations, 1000)
        yield _histogram("shardq_commit_seconds", "Group commit duration, fsync included",
                         bid, b.store.commit_hist)
        handoffs = CounterMetricFamily("shardq_handoffs_total", "Slot handoffs",
                                       labels=["broker", "result"])
        for result, n in b.handoffs.items():
            handoffs.add_metric([bid, result], n)
        yield handoffs
        for name, value, doc in (
                ("shardq_broker_slots", sum(b.owned), "Slots owned"),
                ("shardq_broker_jobs", b.total_jobs, "Jobs held in memory"),
                ("shardq_broker_rss_bytes", b.rss, "Resident memory"),
                ("shardq_topology_epoch", b.epoch, "Topology epoch"),
                ("shardq_broker_storage_held", 1 if b.held else 0,
                 "1 while the map's slots for this broker are owned under another storage"),
                # README "Security and limits": disk full, corruption, time.
                ("shardq_broker_disk_full", 1 if b.refusing_adds else 0,
                 "1 while adds are refused for a full disk (alarm or failed commits)"),
                ("shardq_broker_quarantined_jobs",
                 len(b.store.damage.quarantined) if b.store.damage else 0,
                 "Damaged records left out at start (--salvage)"),
                ("shardq_broker_clock_drift_seconds", _drift_s(b),
                 "How far the wall clock stepped from the broker's monotonic clock")):
            g = GaugeMetricFamily(name, doc, labels=["broker"])
            g.add_metric([bid], value)
            yield g
        episodes = CounterMetricFamily("shardq_broker_disk_full_episodes",
                                       "Disk alarms and failed-commit episodes",
                                       labels=["broker"])
        episodes.add_metric([bid], b.commits.disk_full_total)
        yield episodes


def _drift_s(b: Broker) -> float:
    from shardq.broker.clock import BrokerClock

    return b.clock.drift_ms() / 1000 if isinstance(b.clock, BrokerClock) else 0.0


def _histogram(name: str, doc: str, bid: str, hist: Buckets,
               divisor: float = 1) -> HistogramMetricFamily:
    """A cumulative histogram since the broker started (broker/histogram.py)."""
    fam = HistogramMetricFamily(name, doc, labels=["broker"])
    buckets, total = hist.cumulative(divisor)
    fam.add_metric([bid], buckets=buckets, sum_value=total)
    return fam


def registry_for(broker: Broker) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(BrokerCollector(broker))
    return reg


def start_metrics_server(broker: Broker, host: str,
                         port: int) -> tuple[asyncio.Task[None], int]:
    """Serve /metrics on the running loop; returns the server task and the
    port it bound (the socket is bound before this returns, so `port` 0 works
    and the caller can announce the real one)."""
    import uvicorn

    sock = socket.create_server((host, port))
    app = make_asgi_app(registry_for(broker))
    config = uvicorn.Config(app, log_level="warning", lifespan="off", loop="none")
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    return task, sock.getsockname()[1]
