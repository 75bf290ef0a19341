"""View models of the dashboard: plain data from the snapshot and the topology.

Pure functions (no I/O), so paging, search and sorting at 10,000 queues are
tested and timed without a cluster.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shardq.router import PARTITION_SEP, Topology

from ..membership import natural_key
from . import svg
from .snapshot import Point, QueueRow, Snapshot

PAGE_SIZE = 50
JOB_STATES = ("waiting", "prioritized", "active", "delayed", "completed", "failed",
              "waiting-children")  # the client's get_jobs states
SORTS: dict[str, Callable[[QueueRow], Any]] = {
    "depth": lambda r: (-r.depth, r.name),
    "rate": lambda r: (-r.rate, r.name),
    "name": lambda r: r.name,
}


def fmt_number(v: Any) -> str:
    """12345 -> '12,345'; None -> '-'."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}"
    return f"{v:,}"


def fmt_rate(v: float) -> str:
    """A per-second rate: '0', '3.2', '1,204'."""
    if v == 0:
        return "0"
    return f"{v:,.1f}" if v < 100 else f"{v:,.0f}"


def logical_queue(stored: str, partitions: dict[str, int]) -> str:
    """The queue a user knows: `hot` for its partition `hot~3` (docs/design.md §7)."""
    base, sep, index = stored.rpartition(PARTITION_SEP)
    return base if sep and index.isdigit() and base in partitions else stored


@dataclass(frozen=True, slots=True)
class QueuePage:
    """One page of the queue table, with what the pager needs."""

    rows: list[QueueRow]
    page: int
    pages: int
    matched: int
    total: int
    query: str
    sort: str


def queue_page(rows: Sequence[QueueRow] | Snapshot, *, query: str = "",
               sort: str = "depth", page: int = 1, size: int = PAGE_SIZE) -> QueuePage:
    """Filter by a case-insensitive substring of the name, sort, and cut one page.

    Sorting is by depth (waiting+delayed+active) or rate (added+completed
    per second), largest first, ties by name; or by name. An unknown sort
    falls back to depth; a page past the end shows the last one. Given a
    `Snapshot`, its rows are sorted once for all requests (10,000 rows take
    ~10 ms to sort) and a search only filters them, keeping the order.
    """
    sort = sort if sort in SORTS else "depth"
    key = SORTS[sort]
    ordered = (rows.sorted_by(sort, key) if isinstance(rows, Snapshot)
               else sorted(rows, key=key))
    needle = query.strip().lower()
    matched = [r for r in ordered if needle in r.name.lower()] if needle else ordered
    pages = max(1, math.ceil(len(matched) / size))
    page = min(max(1, page), pages)
    start = (page - 1) * size
    return QueuePage(matched[start:start + size], page, pages, len(matched), len(ordered),
                     query, sort)


def replication_cells(rec: dict[str, Any] | None, slots: int) -> dict[str, Any]:
    """One broker's replication columns (docs/design.md §12) from its `/replication`
    record: follower, in sync, lag (batches shipped, not acknowledged), whether
    it is degraded (a primary owning slots without an in-sync follower answers
    writes off one disk only, as `shardq status` says) and a failover of it
    not done yet ({to, phase}). None: replication is off (`--replicas 0`)."""
    if rec is None:
        return {"follower": None, "in_sync": None, "lag_ops": None, "degraded": False,
                "failover": None}
    fo = rec.get("failover")
    running = fo if isinstance(fo, dict) and fo.get("phase") != "done" else None
    in_sync = bool(rec.get("in_sync"))
    follower = rec.get("follower")
    return {"follower": follower, "in_sync": in_sync, "lag_ops": rec.get("lag_ops"),
            "degraded": bool(slots) and running is None and not (follower and in_sync),
            "failover": running}


def cluster_model(topo: Topology, snap: Snapshot, progress: dict[str, Any], points: list[Point],
                  stats_of: Callable[[str], dict[str, Any] | None],
                  replication: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything `cluster.html` shows; `replication`: the `/replication` records
    (None with `--replicas 0`: no replication columns)."""
    ids = sorted(topo.brokers, key=natural_key)
    palette = svg.colours(ids)
    slot_counts = topo.slot_counts()
    rows = []
    cells: dict[str, dict[str, Any]] = {}
    for bid in ids:
        b = topo.brokers[bid]
        view = snap.view.brokers.get(bid)
        totals = snap.brokers.get(bid)
        raw = stats_of(bid) or {}
        slots = slot_counts.get(bid, 0)
        repl = replication_cells(None if replication is None else replication.get(bid), slots)
        cells[bid] = repl
        rows.append({
            "id": bid, "addr": b.addr, "state": b.state.value, "weight": b.weight,
            "colour": palette[bid], "slots": slots, "repl": repl,
            "live": bool(view and view.live), "age_s": view.age_s if view else None,
            "queues": totals.queues if totals else 0,
            "counts": totals.counts if totals else {},
            "jobs": raw.get("jobs"),
            "added_per_s": totals.added_per_s if totals else 0.0,
            "completed_per_s": totals.completed_per_s if totals else 0.0,
            "spark": svg.line_chart(
                {"added": [p.brokers.get(bid, (0.0, 0.0))[0] for p in points],
                 "completed": [p.brokers.get(bid, (0.0, 0.0))[1] for p in points]},
                CHART_COLOURS, width=160, height=36, label=f"{bid} throughput"),
        })
    moving = list(topo.moving)
    chart = svg.line_chart({"added": [p.cluster[0] for p in points],
                            "completed": [p.cluster[1] for p in points]},
                           CHART_COLOURS, label="cluster added and completed per second")
    total = progress.get("total") or 0
    return {
        "epoch": topo.epoch, "term": topo.term, "brokers": rows,
        "totals": snap.totals, "unowned": sum(1 for o in topo.slot_owners if o is None),
        "picture": svg.slot_picture(topo.slot_owners, moving, palette),
        "moves": [{"label": svg.move_label(m), "fraction": svg.phase_fraction(str(m.get("phase"))),
                   "colour": palette.get(str(m.get("to")), svg.UNOWNED), **m} for m in moving],
        "progress": progress,
        "progress_fraction": (progress.get("done", 0) / total) if total else 0.0,
        "chart": chart, "chart_colours": CHART_COLOURS,
        "overrides": len(topo.overrides), "partitions": dict(topo.partitions),
        "replicated": replication is not None,
        "degraded": [bid for bid, c in cells.items() if c["degraded"]],
        "failovers": [{"primary": bid, **c["failover"]} for bid, c in cells.items()
                      if c["failover"]],
    }


CHART_COLOURS = {"added": "#0072B2", "completed": "#009E73"}


def fmt_ms_time(ms: Any) -> str:
    """Unix ms -> 'YYYY-MM-DD HH:MM:SS.mmm' UTC; '-' when unset."""
    if not isinstance(ms, int | float) or isinstance(ms, bool) or ms <= 0:
        return "-"
    when = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return when.strftime("%Y-%m-%d %H:%M:%S.") + f"{int(ms) % 1000:03d}"


def pretty(value: Any) -> str:
    """A job's data, result or fields as indented JSON (bytes shown as a repr)."""
    return json.dumps(value, indent=2, sort_keys=True, default=repr, ensure_ascii=False)


def short(value: Any, limit: int = 80) -> str:
    """One line of `value` as JSON, cut at `limit` characters."""
    text = json.dumps(value, default=repr, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 1] + "…"
