"""Cumulative latency histograms, cheap enough for the hot path (docs/design.md §10).

`Buckets.observe` is one bisect and two additions (~0.3 us); the broker's
metrics collector turns a snapshot into a Prometheus histogram family at
scrape time. Why not `prometheus_client.Histogram` itself: its `observe`
takes a lock per bucket and per sum, ~4 us on the machine this was built
on, and a job's whole broker-side cost is ~7 us, so observing every ack
through it would cost about half again as much CPU per job. The exposition
is still prometheus_client's (`HistogramMetricFamily`).

Counts only grow, from the broker's start: `rate()` and
`histogram_quantile()` over them are correct. One thread observes at a
time (the writer thread, or the loop thread when it commits inline while
the writer is idle); a scrape copies the counts, so the buckets it reports
are cumulative and never lower than the previous scrape's, and `sum` is at
most one observation ahead of or behind them.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from itertools import accumulate

# Group commit: BEGIN to the return of COMMIT (fsync included), seconds.
COMMIT_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# A job's start (its pull) to its ack, milliseconds as the queue's clock gives them.
JOB_DURATION_BUCKETS_MS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000,
                           60_000, 120_000, 300_000)


class Buckets:
    """Counts of observations per upper bound (`le`), plus their sum."""

    __slots__ = ("counts", "edges", "sum")

    def __init__(self, edges: Sequence[float]) -> None:
        if list(edges) != sorted(set(edges)):
            raise ValueError("bucket edges must be strictly increasing")
        self.edges = tuple(edges)
        self.counts = [0] * (len(self.edges) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to an edge counts in that edge's bucket (le).
        self.counts[bisect_left(self.edges, value)] += 1
        self.sum += value

    def cumulative(self, divisor: float = 1) -> tuple[list[tuple[str, float]], float]:
        """(`[(le, count), ..., ("+Inf", total)]`, sum), edges and sum divided by
        `divisor` (1000 exports milliseconds as seconds)."""
        counts, total = list(self.counts), self.sum
        labels = [repr(float(e / divisor)) for e in self.edges] + ["+Inf"]
        return list(zip(labels, accumulate(counts), strict=True)), total / divisor
