"""Cluster stats from broker heartbeats (docs/design.md §6, §10): what `GET /stats` serves.

Every broker sends `Broker.stats()` with its heartbeat (about once a
second): per queue the retained counts (waiting, delayed, active,
completed, failed) and the running totals (`added_total`, ...). Nothing is
scraped: `StatsBook.observe` keeps, per broker, the last sample and the
per-second rates over the interval since the one before, and `view()`
turns that into a `ClusterView` for the current topology.

Rules the view keeps (and tests/integration/test_coordinator_stats.py checks):

* One owner per queue. When a slot moves A -> B its counters move with it
  (they are queue state), so for a moment both may report the queue. The
  entry of the broker that owns the queue in the topology wins; if the
  owner has not reported it yet, the report with the highest totals (the
  freshest copy) does. Summing over brokers then counts every job once.
* Never frozen silently. A broker whose state is `dead`, or whose last
  sample is older than `stale_after_s`, is not live: its rates are 0, and
  /metrics stops exporting its per-queue series (`shardq_broker_up` 0).
  Its last counts and totals still count in the cluster totals, so those
  never drop because a broker went quiet (its jobs are on its disk, and
  its counters resume from there when it returns).
* Gone means gone. A broker no longer in the topology (left, forgotten)
  disappears with its counters.
* Rates are per queue, over the last heartbeat interval, from coordinator
  receive times. A queue new to a broker is measured against its last
  report from any broker in the last minute (a handoff brought it), else
  against zero at the broker's previous heartbeat (created since); a
  broker's first sample after a coordinator start has rate 0. A counter
  that went down (obliterate) gives rate 0 for that interval, not a
  negative one.
* `p99_ms` is what each broker reports per queue: the p99 of that queue's
  recent start-to-ack durations (a sliding sample of 512), null before any
  job finished there.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from shardq.router import BrokerState, Topology

from .membership import natural_key

log = logging.getLogger("shardq.coordinator.stats")

STATES = ("waiting", "delayed", "active", "completed", "failed")
COUNTERS = ("added", "completed", "failed", "retried", "stalled")
_TOTAL_KEYS = tuple((k, f"{k}_total") for k in COUNTERS)  # a heartbeat's field per counter
STALE_AFTER_S = 3.0  # three missed heartbeats at the broker's default 1 s
MIN_INTERVAL_S = 0.05  # two samples closer than this carry the previous rates on
RECENT_KEEP_S = 60.0  # how long a queue's last report is kept for a handoff's first rate

Rates = tuple[float, float]  # (added/s, completed/s)


@dataclass(frozen=True, slots=True)
class QueueSample:
    """One queue as one heartbeat reported it."""

    counts: dict[str, int]  # STATES -> retained jobs
    totals: dict[str, int]  # COUNTERS -> running totals
    p99_ms: float | None = None


@dataclass(frozen=True, slots=True)
class Sample:
    """One broker's last heartbeat stats, as received at `at` (monotonic seconds)."""

    at: float
    queues: dict[str, QueueSample]
    rates: dict[str, Rates]  # over the interval that ended at `at`


@dataclass(frozen=True, slots=True)
class QueueView:
    """One queue in the cluster view (rates already 0 on a broker that is not live)."""

    counts: dict[str, int]
    totals: dict[str, int]
    added_per_s: float
    completed_per_s: float
    p99_ms: float | None

    def to_json(self) -> dict[str, Any]:
        """The docs/design.md §10 queue entry."""
        return {**self.counts,
                "added_total": self.totals["added"],
                "completed_total": self.totals["completed"],
                "failed_total": self.totals["failed"],
                "added_per_s": round(self.added_per_s, 3),
                "completed_per_s": round(self.completed_per_s, 3),
                "p99_ms": self.p99_ms}


@dataclass(frozen=True, slots=True)
class BrokerView:
    """One broker: its topology state, whether its numbers are live, its queues."""

    id: str
    state: str
    live: bool  # not dead, and reported within stale_after_s
    age_s: float | None  # since its last sample; None: none since the coordinator started
    queues: dict[str, QueueView]

    def total(self) -> QueueView:
        return sum_queues(self.queues.values())


@dataclass(frozen=True, slots=True)
class ClusterView:
    """Every broker of the topology with the queues it owns (each queue once)."""

    epoch: int
    brokers: dict[str, BrokerView]

    def total(self) -> QueueView:
        """Summed over every broker, dead ones at their last known values."""
        return sum_queues(q for b in self.brokers.values() for q in b.queues.values())

    def to_json(self) -> dict[str, Any]:
        """`GET /stats` (docs/design.md §10)."""
        return {
            "epoch": self.epoch,
            "brokers": {b.id: {"state": b.state,
                               "queues": {n: q.to_json() for n, q in b.queues.items()},
                               "totals": b.total().to_json()}
                        for b in self.brokers.values()},
            "totals": self.total().to_json(),
        }


def sum_queues(queues: Iterable[QueueView]) -> QueueView:
    """Counts, totals and rates summed; `p99_ms` the largest known (an upper bound)."""
    counts = dict.fromkeys(STATES, 0)
    totals = dict.fromkeys(COUNTERS, 0)
    added = completed = 0.0
    p99: float | None = None
    for q in queues:
        for k in STATES:
            counts[k] += q.counts[k]
        for k in COUNTERS:
            totals[k] += q.totals[k]
        added += q.added_per_s
        completed += q.completed_per_s
        if q.p99_ms is not None:
            p99 = q.p99_ms if p99 is None else max(p99, q.p99_ms)
    return QueueView(counts, totals, added, completed, p99)


class StatsBook:
    """The last heartbeat stats of every broker, with rates; `view()` aggregates them.

    Plain Python on the coordinator's loop (no locks, no I/O).

    Args:
        clock: monotonic seconds (tests inject one).
        stale_after_s: a broker silent this long shows rate 0 and `up` 0
            even before the coordinator marks it dead.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 stale_after_s: float = STALE_AFTER_S) -> None:
        self._clock = clock
        self._stale_after_s = stale_after_s
        self._samples: dict[str, Sample] = {}
        # queue -> (at, totals) of its last report from any broker: the base of
        # the first rate at a broker a handoff moved it to.
        self._recent: dict[str, tuple[float, dict[str, int]]] = {}
        self._pruned_at = clock()

    def observe(self, broker_id: str, stats: Mapping[str, Any] | None) -> None:
        """Record one heartbeat's stats (the shape of `Broker.stats()`).

        Stats without a `queues` mapping (a broker sends `{}` when its stats
        call failed) are not a sample: the last one is kept and ages, and the
        broker shows as stale rather than as owning no queue. Malformed
        queue entries are skipped, never raised on: a heartbeat must not
        fail because of its stats.
        """
        if stats is None or not isinstance(stats.get("queues"), Mapping):
            return
        try:
            self._observe(broker_id, stats)
        except Exception:
            # A heartbeat that fails gets its broker marked dead: never for stats.
            log.exception("dropping unreadable stats from %s", broker_id)

    def _observe(self, broker_id: str, stats: Mapping[str, Any]) -> None:
        now = self._clock()
        queues = parse_queues(stats["queues"])
        prev = self._samples.get(broker_id)
        rates = {name: self._rate(name, q, prev, now) for name, q in queues.items()}
        self._samples[broker_id] = Sample(now, queues, rates)
        for name, q in queues.items():
            self._recent[name] = (now, q.totals)
        if now - self._pruned_at > RECENT_KEEP_S:
            self._pruned_at = now
            self._recent = {k: v for k, v in self._recent.items()
                            if now - v[0] <= RECENT_KEEP_S}

    def _rate(self, name: str, q: QueueSample, prev: Sample | None, now: float) -> Rates:
        base: tuple[float, Mapping[str, int]] | None = None
        if prev is not None and name in prev.queues:
            base = (prev.at, prev.queues[name].totals)
        else:
            recent = self._recent.get(name)
            if recent is not None:
                base = recent  # moved here (or back) by a handoff
            elif prev is not None:
                base = (prev.at, {})  # created since this broker's last heartbeat
        if base is None:
            return (0.0, 0.0)  # the broker's first sample: nothing to measure against
        dt = now - base[0]
        if dt < MIN_INTERVAL_S:
            return prev.rates.get(name, (0.0, 0.0)) if prev is not None else (0.0, 0.0)
        return (max(0, q.totals["added"] - base[1].get("added", 0)) / dt,
                max(0, q.totals["completed"] - base[1].get("completed", 0)) / dt)

    def view(self, topology: Topology) -> ClusterView:
        """The cluster as of now: each queue under the broker that owns it."""
        for gone in self._samples.keys() - topology.brokers.keys():
            del self._samples[gone]
        now = self._clock()
        chosen = _owners(topology, self._samples)
        brokers: dict[str, BrokerView] = {}
        for bid in sorted(topology.brokers, key=natural_key):
            state = topology.brokers[bid].state
            sample = self._samples.get(bid)
            age = None if sample is None else max(0.0, now - sample.at)
            # A broker held for lost storage reports an empty disk, not its queues.
            live = (state not in (BrokerState.DEAD, BrokerState.LOST_STORAGE) and age is not None
                    and age <= self._stale_after_s)
            queues: dict[str, QueueView] = {}
            if sample is not None:
                for name in sorted(sample.queues):
                    if chosen.get(name) == bid:
                        queues[name] = _queue_view(sample, name, live)
            brokers[bid] = BrokerView(bid, state.value, live, age, queues)
        return ClusterView(topology.epoch, brokers)


def _queue_view(sample: Sample, name: str, live: bool) -> QueueView:
    q = sample.queues[name]
    added, completed = sample.rates.get(name, (0.0, 0.0)) if live else (0.0, 0.0)
    return QueueView(dict(q.counts), dict(q.totals), added, completed, q.p99_ms)


def _owners(topology: Topology, samples: Mapping[str, Sample]) -> dict[str, str]:
    """queue -> the broker whose report of it counts (see the module docstring)."""
    reporters: dict[str, list[str]] = {}
    for bid, sample in samples.items():
        for name in sample.queues:
            reporters.setdefault(name, []).append(bid)
    chosen: dict[str, str] = {}
    for name, bids in reporters.items():
        if len(bids) == 1:
            chosen[name] = bids[0]
            continue
        try:
            owner = topology.owner_of(name)
        except UnicodeEncodeError:  # not a name a broker would accept; keep the first
            owner = None
        if owner in bids:
            chosen[name] = owner
        else:
            chosen[name] = max(sorted(bids, key=natural_key),
                               key=lambda b: _freshness(samples[b].queues[name]))
    return chosen


def _freshness(q: QueueSample) -> tuple[int, int]:
    # Counters only grow while a queue lives, so the larger copy is the newer one.
    return (q.totals["added"], q.totals["completed"] + q.totals["failed"])


def parse_queues(raw: Any) -> dict[str, QueueSample]:
    """`stats["queues"]` of a heartbeat -> samples; entries that are not dicts are skipped."""
    if not isinstance(raw, Mapping):
        return {}
    out: dict[str, QueueSample] = {}
    for name, q in raw.items():
        if not isinstance(name, str) or not isinstance(q, Mapping):
            continue
        p99: Any = q.get("p99_ms")
        get = q.get
        out[name] = QueueSample(
            counts={k: _count(get(k)) for k in STATES},
            totals={k: _count(get(t)) for k, t in _TOTAL_KEYS},
            p99_ms=float(p99) if _is_number(p99) else None,
        )
    return out


def _is_number(v: Any) -> bool:
    # JSON may carry NaN and Infinity; neither is a count or a latency.
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _count(v: Any) -> int:
    if type(v) is int:  # nearly every value: skip the general checks (10k queues a beat)
        return v if v >= 0 else 0
    return int(v) if _is_number(v) and v >= 0 else 0
