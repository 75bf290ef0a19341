"""The cluster view's replication columns on a real `--replicas 1` cluster
(docs/design.md §12; coordinator/ui/views.py `replication_cells`): each
broker's follower, in-sync flag and lag match `/replication`, and killing a
follower marks its primary degraded on the page."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

import shardq
from shardq.router import Topology

from ..conftest import queue_on
from .conftest import LoopThread, UiCluster, shot, wait_for
from .test_dashboard import css, open_view

pytestmark = pytest.mark.slow

# Long enough that the killed follower is not yet replaced (dead after this)
# while the test looks: its primary stays degraded meanwhile.
HEARTBEAT_TIMEOUT_MS = 60_000


def page_rows(driver: Any) -> dict[str, dict[str, str]]:
    """Each broker row's replication cells, read in one script."""
    return dict(driver.execute_script("""
        const rows = {};
        for (const tr of document.querySelectorAll('#brokers tr.broker'))
          rows[tr.dataset.broker] = {
            follower: tr.dataset.follower, in_sync: tr.dataset.inSync, lag: tr.dataset.lag,
            degraded: tr.dataset.degraded, marker: !!tr.querySelector('.tag.degraded'),
            follower_text: tr.querySelector('td.follower').textContent.trim()};
        return rows;"""))


def in_sync(c: UiCluster) -> dict[str, Any] | None:
    rep: dict[str, Any] = c.get("/replication")
    return rep if len(rep) == 3 and all(r["in_sync"] for r in rep.values()) else None


def test_replication_columns_match_the_records_and_a_lost_follower_shows_degraded(
        ui_cluster: Any, browser: Any, aloop: LoopThread) -> None:
    c: UiCluster = ui_cluster(None, "--replicas", "1",
                              "--heartbeat-timeout-ms", str(HEARTBEAT_TIMEOUT_MS))
    wait_for(lambda: in_sync(c), "every primary's follower in sync", timeout=60)
    open_view(browser, c, "cluster", "#brokers tr.broker[data-in-sync='true']")

    def matches() -> bool:
        before, rows, after = c.get("/replication"), page_rows(browser), c.get("/replication")
        if sorted(rows) != sorted(before):
            return False
        for bid, row in rows.items():
            rec = before[bid]
            lags = {"" if r[bid]["lag_ops"] is None else str(r[bid]["lag_ops"])
                    for r in (before, after)}
            if (row["follower"], row["in_sync"]) != (rec["follower"], "true" if rec["in_sync"]
                                                     else "false") or row["lag"] not in lags:
                return False
            assert row["follower_text"] == rec["follower"]
            assert row["degraded"] == "false" and not row["marker"]
        return True

    wait_for(matches, "the page's replication columns to match /replication")
    assert "degraded" not in css(browser, "#replication")[0].text
    shot(browser, "cluster-replication")

    rep = c.get("/replication")
    primary = "b1"
    follower = rep[primary]["follower"]
    c.brokers[follower].kill()
    # A write on the primary ships a batch the dead follower never acks: the
    # primary gives it up and records it out of sync (an idle link may notice
    # later). The add's own outcome does not matter here.
    queue = queue_on(Topology.from_dict(c.get("/topology")), primary, "repl")
    client = aloop.call(shardq.connect(c.url))
    try:
        adding = asyncio.run_coroutine_threadsafe(client.queue(queue).add("j", {}), aloop.loop)
        wait_for(lambda: c.get("/replication")[primary]["in_sync"] is False,
                 f"{primary}'s follower {follower} out of sync", timeout=60)
        with contextlib.suppress(Exception):
            adding.result(30)
    finally:
        aloop.call(client.aclose())
    wait_for(lambda: page_rows(browser)[primary]["degraded"] == "true"
             and page_rows(browser)[primary]["marker"], f"{primary} marked degraded on the page")
    rows = page_rows(browser)
    # Its follower is the killed one, or (on a slow machine, once that one was found
    # dead) a new one still catching up: out of sync either way.
    assert rows[primary]["in_sync"] == "false" and rows[primary]["follower"]
    banner = css(browser, "#replication")[0]
    assert primary in (banner.get_attribute("data-degraded") or "").split()
    assert "degraded" in banner.text
    shot(browser, "cluster-degraded")
