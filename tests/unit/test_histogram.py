"""broker/histogram.py: cumulative buckets with Prometheus `le` semantics."""

from __future__ import annotations

import pytest

from shardq.broker.histogram import COMMIT_BUCKETS_S, JOB_DURATION_BUCKETS_MS, Buckets


def test_a_value_on_an_edge_counts_in_that_edge_and_counts_are_cumulative() -> None:
    b = Buckets((1, 5, 10))
    for v in (0, 1, 2, 5, 11, 11):
        b.observe(v)
    buckets, total = b.cumulative()
    assert buckets == [("1.0", 2), ("5.0", 4), ("10.0", 4), ("+Inf", 6)]
    assert total == 30


def test_milliseconds_export_as_seconds() -> None:
    b = Buckets(JOB_DURATION_BUCKETS_MS)
    b.observe(30)
    buckets, total = b.cumulative(1000)
    assert dict(buckets)["0.025"] == 0 and dict(buckets)["0.05"] == 1
    assert total == 0.03 and buckets[-1] == ("+Inf", 1)


def test_commit_buckets_span_tens_of_microseconds_to_seconds() -> None:
    assert COMMIT_BUCKETS_S[0] <= 0.0001 and COMMIT_BUCKETS_S[-1] >= 1.0
    assert repr(COMMIT_BUCKETS_S[0]) == Buckets(COMMIT_BUCKETS_S).cumulative()[0][0][0]


@pytest.mark.parametrize("edges", [(1, 1, 2), (5, 1)])
def test_edges_must_be_strictly_increasing(edges: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        Buckets(edges)
