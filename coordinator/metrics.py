"""`GET /metrics` on the coordinator: the cluster as Prometheus text (docs/design.md §6, §10).

A custom collector over one `ClusterView`, registered in a registry made
for the request (no global registry). Series:

    shardq_jobs_{added,completed,failed,retried,stalled}_total{broker,queue}
    shardq_queue_jobs{broker,queue,state}         retained jobs per state
    shardq_broker_up{broker}                      1: reporting; 0: dead, silent or no stats yet
    shardq_broker_stats_age_seconds{broker}       since that broker's last heartbeat stats
    shardq_broker_lost_storage{broker}            1: held, it came back without its data dir
    shardq_cluster_jobs_{...}_total               summed over brokers and queues; no labels
    shardq_cluster_queue_jobs{state}              summed over brokers and queues
    shardq_cluster_brokers{state}                 brokers per membership state
    shardq_coordinator_epoch                      the topology epoch

Per-broker series are exported for live brokers only, so a dead or silent
broker's series go stale in Prometheus instead of repeating a frozen value;
`shardq_broker_up` says which. The cluster totals keep a non-live broker at
its last known values, so they never drop (and never fake a counter reset)
because a broker went quiet: while every broker is up they equal the sum of
the per-broker series. The cluster totals carry no `queue` label; a queue's
cluster-wide numbers are `sum by (queue) (shardq_jobs_completed_total)`
(each queue is exported by its owner only, so the sum counts it once).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shardq.router import BrokerState

from .stats import COUNTERS, STATES, ClusterView


class ClusterCollector(Collector):
    """Yields the series above for one `ClusterView`."""

    def __init__(self, view: ClusterView) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        yield from self._per_broker()
        yield from self._cluster()

    def _per_broker(self) -> Iterator[Metric]:
        live = [b for b in self.view.brokers.values() if b.live]
        for key in COUNTERS:
            fam = CounterMetricFamily(f"shardq_jobs_{key}", f"Jobs {key}, running total",
                                      labels=["broker", "queue"])
            for b in live:
                for name, q in b.queues.items():
                    fam.add_metric([b.id, name], q.totals[key])
            yield fam
        depth = GaugeMetricFamily("shardq_queue_jobs", "Jobs retained per state",
                                  labels=["broker", "queue", "state"])
        for b in live:
            for name, q in b.queues.items():
                for state in STATES:
                    depth.add_metric([b.id, name, state], q.counts[state])
        yield depth
        up = GaugeMetricFamily("shardq_broker_up",
                               "1 if the broker is not dead and its stats are fresh",
                               labels=["broker"])
        age = GaugeMetricFamily("shardq_broker_stats_age_seconds",
                                "Time since the broker's last heartbeat stats",
                                labels=["broker"])
        lost = GaugeMetricFamily("shardq_broker_lost_storage",
                                 "1 if the broker came back without the data directory its "
                                 "slots are owned under (held; its queues are unavailable)",
                                 labels=["broker"])
        for b in self.view.brokers.values():
            up.add_metric([b.id], 1 if b.live else 0)
            if b.age_s is not None:
                age.add_metric([b.id], b.age_s)
            lost.add_metric([b.id], 1 if b.state == BrokerState.LOST_STORAGE.value else 0)
        yield up
        yield age
        yield lost

    def _cluster(self) -> Iterator[Metric]:
        total = self.view.total()
        for key in COUNTERS:
            fam = CounterMetricFamily(f"shardq_cluster_jobs_{key}",
                                      f"Jobs {key} in the cluster, running total")
            fam.add_metric([], total.totals[key])
            yield fam
        depth = GaugeMetricFamily("shardq_cluster_queue_jobs",
                                  "Jobs retained per state in the cluster", labels=["state"])
        for state in STATES:
            depth.add_metric([state], total.counts[state])
        yield depth
        brokers = GaugeMetricFamily("shardq_cluster_brokers", "Brokers per membership state",
                                    labels=["state"])
        for bs in BrokerState:
            n = sum(1 for b in self.view.brokers.values() if b.state == bs.value)
            brokers.add_metric([bs.value], n)
        yield brokers
        epoch = GaugeMetricFamily("shardq_coordinator_epoch", "Topology epoch")
        epoch.add_metric([], self.view.epoch)
        yield epoch


def render(view: ClusterView) -> bytes:
    """The Prometheus text exposition of `view` (content type `CONTENT_TYPE_LATEST`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(view))
    return generate_latest(registry)
