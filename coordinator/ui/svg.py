"""Inline SVG for the dashboard: the 4096-slot picture and the throughput chart.

Pure functions from data to markup (no I/O, no clock), so they are tested
with plain values. Both keep the markup small whatever the cluster's size:
the slot picture draws one `<path>` per owner made of row segments (a
ring-assigned map of 3 brokers has a few hundred runs, not 4096 cells), and
the chart one polyline per series.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from shardq.protocol import PHASES
from shardq.router import NUM_SLOTS

COLUMNS = 64  # 64 x 64 cells = 4096 slots
CELL = 6  # px

# Distinct, colour-blind-friendlier hues (Okabe-Ito, then a few more).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00",
           "#F0E442", "#7F3C8D", "#11A579", "#3969AC", "#F2B701", "#E73F74")
UNOWNED = "#d0d0d0"


def colours(broker_ids: Sequence[str]) -> dict[str, str]:
    """A stable colour per broker, by its position in `broker_ids` (sorted by the caller)."""
    return {b: PALETTE[i % len(PALETTE)] for i, b in enumerate(broker_ids)}


def _segments(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """Sorted slots -> (row, first column, width) runs of consecutive cells within a row."""
    out: list[tuple[int, int, int]] = []
    for s in slots:
        row, col = divmod(s, COLUMNS)
        if out and out[-1][0] == row and out[-1][1] + out[-1][2] == col:
            r, c, w = out[-1]
            out[-1] = (r, c, w + 1)
        else:
            out.append((row, col, 1))
    return out


def _path(slots: Sequence[int]) -> str:
    return "".join(f"M{c * CELL},{r * CELL}h{w * CELL}v{CELL}h-{w * CELL}z"
                   for r, c, w in _segments(slots))


def slot_picture(owners: Sequence[str | None], moving: Sequence[Mapping[str, Any]],
                 palette: Mapping[str, str]) -> str:
    """The slots as a 64x64 grid coloured by owner; slots of a move in flight are
    hatched in the target's colour and outlined.

    Args:
        owners: `Topology.slot_owners` (NUM_SLOTS entries, None = unowned).
        moving: the topology's `moving` entries (`slots`, `from`, `to`, `phase`).
        palette: broker id -> colour (`colours()`).
    """
    by_owner: dict[str | None, list[int]] = {}
    for s in range(NUM_SLOTS):
        by_owner.setdefault(owners[s], []).append(s)
    size = COLUMNS * CELL
    parts = [f'<svg class="slots" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {size} '
             f'{size}" width="{size}" height="{size}" role="img" '
             f'aria-label="4096 slots coloured by owner">',
             "<defs>"]
    targets = sorted({str(m.get("to")) for m in moving})
    for i, target in enumerate(targets):
        colour = palette.get(target, UNOWNED)
        parts.append(f'<pattern id="hatch{i}" width="4" height="4" patternUnits="userSpaceOnUse" '
                     f'patternTransform="rotate(45)"><rect width="4" height="4" fill="#fff"/>'
                     f'<rect width="2" height="4" fill="{colour}"/></pattern>')
    parts.append("</defs>")
    for owner, slots in sorted(by_owner.items(), key=lambda kv: str(kv[0])):
        fill = UNOWNED if owner is None else palette.get(owner, UNOWNED)
        parts.append(f'<path class="owner" data-owner="{escape(str(owner or ""))}" '
                     f'data-slots="{len(slots)}" fill="{fill}" d="{_path(slots)}"/>')
    for m in moving:
        slots = sorted(int(s) for s in m.get("slots") or ())
        if not slots:
            continue  # a one-queue move (override) has no slot to draw
        hatch = targets.index(str(m.get("to")))
        parts.append(f'<path class="moving" data-move="{escape(str(m.get("move_id", "")))}" '
                     f'data-from="{escape(str(m.get("from")))}" '
                     f'data-to="{escape(str(m.get("to")))}" data-slots="{len(slots)}" '
                     f'fill="url(#hatch{hatch})" stroke="#000" stroke-width="0.6" '
                     f'd="{_path(slots)}"><title>{escape(move_label(m))}</title></path>')
    parts.append("</svg>")
    return "".join(parts)


def move_label(m: Mapping[str, Any]) -> str:
    """`b1 -> b4: 64 slots, copy (2/7)` (a move's phase is its progress)."""
    phase = str(m.get("phase"))
    step = PHASES.index(phase) + 1 if phase in PHASES else 0
    what = (f"{len(m.get('slots') or ())} slots" if m.get("slots")
            else f"queue {m.get('queue')}")
    return f"{m.get('from')} -> {m.get('to')}: {what}, {phase} ({step}/{len(PHASES)})"


def phase_fraction(phase: str) -> float:
    """How far through its steps a move in `phase` is, 0..1."""
    return (PHASES.index(phase) + 1) / len(PHASES) if phase in PHASES else 0.0


def line_chart(series: Mapping[str, Sequence[float]], palette: Mapping[str, str], *,
               width: int = 560, height: int = 140, label: str = "") -> str:
    """A line chart of equally spaced samples (oldest first), one polyline per series,
    scaled to the largest value shown, with that value as the top label."""
    top = max((v for values in series.values() for v in values), default=0.0)
    scale = top if top > 0 else 1.0
    pad = 4
    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} '
             f'{height}" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(label)}">',
             f'<rect width="{width}" height="{height}" fill="#fafafa" stroke="#ddd"/>',
             f'<text x="{pad}" y="12" font-size="10" fill="#666">{top:,.0f}/s</text>',
             f'<text x="{pad}" y="{height - pad}" font-size="10" fill="#666">0</text>']
    for name, values in series.items():
        if not values:
            continue
        n = max(len(values) - 1, 1)
        points = " ".join(
            f"{pad + i * (width - 2 * pad) / n:.1f},"
            f"{height - pad - v / scale * (height - 2 * pad - 12):.1f}"
            for i, v in enumerate(values))
        parts.append(f'<polyline class="series" data-series="{escape(name)}" fill="none" '
                     f'stroke="{palette.get(name, "#333")}" stroke-width="1.5" '
                     f'points="{points}"/>')
    parts.append("</svg>")
    return "".join(parts)
