"""The dashboard's pure parts: queue paging/search/sort, the slot picture, the chart,
action validation and which paths are public (coordinator/ui)."""

from __future__ import annotations

import asyncio
import re

import pytest

from shardq.coordinator.errors import BadRequest
from shardq.coordinator.stats import QueueView
from shardq.coordinator.ui import actions, is_public, svg, views
from shardq.coordinator.ui.snapshot import QueueRow


def row(name: str, waiting: int = 0, added: float = 0.0, broker: str = "b1") -> QueueRow:
    counts = {"waiting": waiting, "delayed": 0, "active": 0, "completed": 0, "failed": 0}
    totals = dict.fromkeys(("added", "completed", "failed", "retried", "stalled"), 0)
    return QueueRow(name, broker, QueueView(counts, totals, added, 0.0, None))


ROWS = [row(f"q-{i}", waiting=i % 97, added=float(i % 13)) for i in range(10_000)]


def test_queue_page_cuts_one_page_of_the_deepest_queues_first() -> None:
    page = views.queue_page(ROWS, page=1, size=50)
    assert len(page.rows) == 50 and page.pages == 200 and page.total == 10_000
    depths = [r.depth for r in page.rows]
    assert depths == sorted(depths, reverse=True) and depths[0] == 96


def test_queue_page_searches_by_substring_case_insensitively() -> None:
    page = views.queue_page(ROWS, query="Q-999", sort="name")
    names = [r.name for r in page.rows]
    assert page.matched == 11 and names == sorted(names) and all("q-999" in n for n in names)


def test_queue_page_by_rate_and_past_the_end() -> None:
    page = views.queue_page(ROWS, sort="rate", page=10_000)
    assert page.page == page.pages == 200
    first = views.queue_page(ROWS, sort="rate").rows[0]
    assert first.rate == 12.0
    assert views.queue_page(ROWS, sort="bogus").sort == "depth"
    assert views.queue_page([], query="x").rows == []


def test_slot_picture_draws_every_slot_once_per_owner_and_hatches_moves() -> None:
    owners: list[str | None] = [("b1", "b2", "<b3>")[s % 3] for s in range(4096)]
    owners[5] = None
    moving = [{"move_id": "m1", "slots": [0, 1, 2, 64], "from": "b1", "to": "<b3>",
               "phase": "copy"}]
    out = svg.slot_picture(owners, moving, svg.colours(["b1", "b2", "<b3>"]))
    drawn = {m[0]: int(m[1]) for m in re.findall(r'data-owner="([^"]*)" data-slots="(\d+)"', out)}
    assert sum(drawn.values()) == 4096 and drawn[""] == 1
    assert "&lt;b3&gt;" in out and "<b3>" not in out  # names are escaped
    assert out.count('class="moving"') == 1 and 'data-slots="4"' in out
    assert svg.move_label(moving[0]) == "b1 -> <b3>: 4 slots, copy (2/7)"


def test_slot_picture_merges_a_run_into_one_segment_per_row() -> None:
    owners: list[str | None] = ["b1"] * 4096
    out = svg.slot_picture(owners, [], svg.colours(["b1"]))
    assert out.count("M") == 64  # one full-width segment per row


def test_line_chart_scales_to_the_largest_value() -> None:
    out = svg.line_chart({"added": [0.0, 5.0, 1200.0], "completed": []}, {})
    assert "1,200/s" in out and out.count("<polyline") == 1
    assert "0/s" in svg.line_chart({}, {})


@pytest.mark.parametrize("body", [
    {}, {"action": "nope"}, {"action": 3}, {"action": "pause"}, {"action": "pause", "queue": ""},
    {"action": "retry_job", "queue": "q"}, {"action": "drain", "broker": 7},
])
def test_actions_refuse_unknown_names_and_missing_fields(body: dict[str, object]) -> None:
    with pytest.raises(BadRequest):
        asyncio.run(actions.run(None, body))  # type: ignore[arg-type]


def test_only_the_shell_and_static_files_are_public() -> None:
    assert is_public("/ui") and is_public("/ui/") and is_public("/ui/static/app.js")
    for path in ("/ui/api/cluster", "/ui/api/action", "/topology", "/ui/staticx", "/uix"):
        assert not is_public(path)


def test_formats() -> None:
    assert views.fmt_number(12345) == "12,345" and views.fmt_number(None) == "-"
    assert views.fmt_rate(0) == "0" and views.fmt_rate(3.25) == "3.2"
    assert views.fmt_ms_time(0) == "-"
    assert views.fmt_ms_time(1_700_000_000_123) == "2023-11-14 22:13:20.123"
    assert views.short("x" * 200).endswith("…")


def test_a_partition_row_links_to_its_logical_queue() -> None:
    parts = {"hot": 4}
    assert views.logical_queue("hot~3", parts) == "hot"
    assert views.logical_queue("cold~3", parts) == "cold~3"  # not declared partitioned
    assert views.logical_queue("hot~x", parts) == "hot~x"
    assert views.logical_queue("plain", parts) == "plain"


def _book_with(clock: list[float]) -> tuple[object, object]:
    from shardq.coordinator.stats import StatsBook
    from shardq.router import BrokerInfo, Topology

    topo = Topology.standalone("b1", "h:1")
    topo.brokers["b2"] = BrokerInfo("b2", "h:2")
    topo.slot_owners = [("b1", "b2")[s % 2] for s in range(4096)]
    book = StatsBook(clock=lambda: clock[0])
    return book, topo


def _beat(book: object, topo: object, added: int) -> None:
    for bid in ("b1", "b2"):
        queues = {f"q{i}": {"waiting": 1, "added_total": added}
                  for i in range(20) if topo.owner_of(f"q{i}") == bid}  # type: ignore[attr-defined]
        book.observe(bid, {"queues": queues})  # type: ignore[attr-defined]


def test_snapshots_are_shared_for_a_second_and_the_chart_samples_their_rates() -> None:
    from shardq.coordinator.ui.snapshot import MIN_AGE_S, Snapshots, Throughput

    clock = [100.0]
    book, topo = _book_with(clock)
    _beat(book, topo, 0)
    clock[0] += 1.0
    _beat(book, topo, 10)  # every queue: 10 added over 1 s
    snaps = Snapshots(book, lambda: topo, clock=lambda: clock[0])  # type: ignore[arg-type]
    first = snaps.current()
    assert snaps.current() is first  # within MIN_AGE_S: the same snapshot
    assert first.totals.queues == 20 and first.totals.counts["waiting"] == 20
    assert first.row("q3") is not None and first.row("nope") is None
    chart = Throughput(snaps)
    clock[0] += MIN_AGE_S
    chart.sample()
    assert snaps.current() is not first
    point = chart.points[-1]
    assert point.cluster[0] == 200.0  # 20 queues x 10/s
    assert sum(a for a, _ in point.brokers.values()) == 200.0
    assert snaps.watched_within(1.0)
    clock[0] += 1000
    assert not snaps.watched_within(150.0)


@pytest.mark.parametrize(("rec", "slots", "degraded", "failover"), [
    ({"follower": "b2", "in_sync": True, "lag_ops": 0}, 10, False, None),
    ({"follower": "b2", "in_sync": False, "lag_ops": None}, 10, True, None),
    ({"follower": None, "in_sync": False}, 10, True, None),
    ({"follower": "b2", "in_sync": False}, 0, False, None),  # owns nothing: nothing at risk
    ({"follower": "b2", "in_sync": True,
      "failover": {"to": "b2", "phase": "commit", "epoch": 3}}, 10, False, "commit"),
    ({"follower": "b2", "in_sync": True,
      "failover": {"to": "b2", "phase": "done", "epoch": 3}}, 10, False, None),
])
def test_replication_cells_mark_a_primary_without_an_in_sync_follower_degraded(
        rec: dict[str, object], slots: int, degraded: bool, failover: str | None) -> None:
    cells = views.replication_cells(rec, slots)
    assert cells["degraded"] is degraded
    assert (cells["failover"] or {}).get("phase") == failover
    assert cells["follower"] == rec["follower"] and cells["in_sync"] is rec["in_sync"]


def test_replication_cells_are_empty_without_replication() -> None:
    assert views.replication_cells(None, 10) == {
        "follower": None, "in_sync": None, "lag_ops": None, "degraded": False, "failover": None}
