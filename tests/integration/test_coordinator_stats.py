"""Cluster stats on the coordinator (docs/design.md §6, §10): GET /stats and GET /metrics.

Most tests feed `StatsBook` fake heartbeat stats (the shape of
`Broker.stats()`) under an injected clock, with no sockets; the last ones
post the same fake heartbeats to a real `shardq coordinator` process.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from shardq.coordinator.metrics import render
from shardq.coordinator.stats import StatsBook
from shardq.router import NUM_SLOTS, BrokerInfo, BrokerState, Topology, slot_of

from ..conftest import Proc
from .test_coordinator_http import client, register, start_coordinator, wait_until

QUEUE_KEYS = {"waiting", "delayed", "active", "completed", "failed", "added_total",
              "completed_total", "failed_total", "added_per_s", "completed_per_s", "p99_ms"}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def topology(owner: str = "b1", brokers: tuple[str, ...] = ("b1", "b2"),
             dead: tuple[str, ...] = (), **queue_owners: str) -> Topology:
    """Every slot owned by `owner`, except the slots of `queue_owners` (queue=broker)."""
    topo = Topology(epoch=7, brokers={
        b: BrokerInfo(b, f"127.0.0.1:{7100 + i}",
                      BrokerState.DEAD if b in dead else BrokerState.ACTIVE)
        for i, b in enumerate(brokers, 1)})
    topo.slot_owners = [owner] * NUM_SLOTS
    topo.slot_epochs = [1] * NUM_SLOTS
    for q, b in queue_owners.items():
        topo.slot_owners[slot_of(q)] = b
    return topo


def qstats(added: int = 0, completed: int = 0, failed: int = 0, waiting: int = 0,
           active: int = 0, **extra: Any) -> dict[str, Any]:
    """One queue as `Broker.stats()` reports it."""
    return {"waiting": waiting, "delayed": 0, "active": active, "completed": completed,
            "failed": failed, "paused": False, "added_total": added,
            "completed_total": completed, "failed_total": failed, "retried_total": 0,
            "stalled_total": 0, **extra}


def beat(book: StatsBook, bid: str, **queues: dict[str, Any]) -> None:
    book.observe(bid, {"broker_id": bid, "epoch": 7, "slots": 1, "queues": queues, "jobs": 0})


def metrics_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample: (name, sorted labels) -> value (parsed, so the text must be valid)."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# -- rates ----------------------------------------------------------------------------------


def test_rates_are_per_second_over_the_last_heartbeat_interval() -> None:
    clock = Clock()
    book = StatsBook(clock)
    topo = topology()
    beat(book, "b1", emails=qstats(added=100, completed=50))
    first = book.view(topo).to_json()["brokers"]["b1"]["queues"]["emails"]
    assert (first["added_per_s"], first["completed_per_s"]) == (0.0, 0.0), "nothing to diff yet"

    clock.now += 1.0
    beat(book, "b1", emails=qstats(added=300, completed=150))
    q = book.view(topo).to_json()["brokers"]["b1"]["queues"]["emails"]
    assert (q["added_per_s"], q["completed_per_s"]) == (200.0, 100.0)

    clock.now += 2.0
    beat(book, "b1", emails=qstats(added=500, completed=150))
    q = book.view(topo).to_json()["brokers"]["b1"]["queues"]["emails"]
    assert (q["added_per_s"], q["completed_per_s"]) == (100.0, 0.0)


def test_a_queue_created_since_the_last_heartbeat_is_measured_from_zero() -> None:
    clock = Clock()
    book = StatsBook(clock)
    beat(book, "b1", old=qstats(added=5))
    clock.now += 0.5
    beat(book, "b1", old=qstats(added=5), new=qstats(added=40, completed=10))
    q = book.view(topology()).to_json()["brokers"]["b1"]["queues"]["new"]
    assert (q["added_per_s"], q["completed_per_s"]) == (80.0, 20.0)


def test_a_counter_that_went_down_gives_rate_zero_not_negative() -> None:
    clock = Clock()
    book = StatsBook(clock)
    beat(book, "b1", q=qstats(added=1000, completed=1000))
    clock.now += 1.0
    beat(book, "b1", q=qstats(added=3))  # obliterated, then 3 adds
    q = book.view(topology()).to_json()["brokers"]["b1"]["queues"]["q"]
    assert (q["added_per_s"], q["completed_per_s"], q["added_total"]) == (0.0, 0.0, 3)


def test_heartbeats_closer_than_the_minimum_interval_carry_the_rates_on() -> None:
    clock = Clock()
    book = StatsBook(clock)
    beat(book, "b1", q=qstats(added=0))
    clock.now += 1.0
    beat(book, "b1", q=qstats(added=50))
    clock.now += 0.001
    beat(book, "b1", q=qstats(added=51))
    assert book.view(topology()).to_json()["brokers"]["b1"]["queues"]["q"]["added_per_s"] == 50.0


# -- dead and silent brokers ----------------------------------------------------------------


def test_a_dead_broker_is_marked_dead_with_zero_rates_and_its_series_are_not_exported(
        ) -> None:
    clock = Clock()
    book = StatsBook(clock)
    q2 = "on-b2"
    beat(book, "b1", a=qstats(added=10, completed=10))
    beat(book, "b2", **{q2: qstats(added=100, completed=40, waiting=60)})
    clock.now += 1.0
    beat(book, "b1", a=qstats(added=20, completed=20))
    beat(book, "b2", **{q2: qstats(added=200, completed=80, waiting=120)})
    live = topology(**{q2: "b2"})
    assert book.view(live).to_json()["brokers"]["b2"]["totals"]["added_per_s"] == 100.0

    view = book.view(topology(dead=("b2",), **{q2: "b2"}))
    stats = view.to_json()
    b2 = stats["brokers"]["b2"]
    assert b2["state"] == "dead"
    assert b2["queues"][q2]["added_per_s"] == 0.0
    assert b2["queues"][q2]["completed_per_s"] == 0.0
    assert b2["queues"][q2]["waiting"] == 120, "last known, marked dead"
    # Cluster totals keep the dead broker's last counters: they never drop.
    assert stats["totals"]["added_total"] == 220
    assert stats["totals"]["added_per_s"] == 10.0, "only b1 is live"

    m = metrics_of(render(view).decode())
    assert m[("shardq_broker_up", (("broker", "b2"),))] == 0
    assert m[("shardq_broker_up", (("broker", "b1"),))] == 1
    assert not [k for k in m if ("broker", "b2") in k[1] and k[0].startswith("shardq_jobs")]
    assert not [k for k in m if ("broker", "b2") in k[1] and k[0] == "shardq_queue_jobs"]
    assert m[("shardq_jobs_added_total", (("broker", "b1"), ("queue", "a")))] == 20
    assert m[("shardq_cluster_jobs_added_total", ())] == 220
    assert m[("shardq_cluster_brokers", (("state", "dead"),))] == 1


def test_a_silent_broker_goes_stale_before_it_is_marked_dead() -> None:
    clock = Clock()
    book = StatsBook(clock, stale_after_s=3.0)
    beat(book, "b1", q=qstats(added=0))
    clock.now += 1.0
    beat(book, "b1", q=qstats(added=100))
    topo = topology()
    assert book.view(topo).brokers["b1"].live
    clock.now += 3.5  # no heartbeat since
    view = book.view(topo)
    b1 = view.brokers["b1"]
    assert (b1.state, b1.live, b1.age_s) == ("active", False, 3.5)
    assert view.to_json()["brokers"]["b1"]["queues"]["q"]["added_per_s"] == 0.0
    m = metrics_of(render(view).decode())
    assert m[("shardq_broker_up", (("broker", "b1"),))] == 0
    assert m[("shardq_broker_stats_age_seconds", (("broker", "b1"),))] == 3.5


def test_a_broker_without_stats_yet_is_listed_empty_and_not_up() -> None:
    book = StatsBook(Clock())
    view = book.view(topology())
    assert view.to_json()["brokers"]["b2"] == {
        "state": "active", "queues": {},
        "totals": {**dict.fromkeys(QUEUE_KEYS - {"p99_ms"}, 0), "p99_ms": None}}
    assert metrics_of(render(view).decode())[("shardq_broker_up", (("broker", "b2"),))] == 0


def test_empty_stats_from_a_failed_stats_call_keep_the_last_sample() -> None:
    clock = Clock()
    book = StatsBook(clock)
    beat(book, "b1", q=qstats(added=9))
    clock.now += 1.0
    book.observe("b1", {})  # the broker sends {} when its stats call raised
    book.observe("b1", None)
    b1 = book.view(topology()).brokers["b1"]
    assert b1.queues["q"].totals["added"] == 9
    assert b1.age_s == 1.0


def test_brokers_gone_from_the_topology_disappear_with_their_counters() -> None:
    book = StatsBook(Clock())
    beat(book, "b1", a=qstats(added=1))
    beat(book, "b3", c=qstats(added=1000))  # left, or forgotten
    stats = book.view(topology()).to_json()
    assert set(stats["brokers"]) == {"b1", "b2"}
    assert stats["totals"]["added_total"] == 1
    # ... and they stay gone: the sample was dropped, not hidden, so the same id
    # registering again starts with no queues until its first heartbeat.
    again = book.view(topology(brokers=("b1", "b2", "b3"))).to_json()
    assert again["brokers"]["b3"]["queues"] == {}
    assert again["totals"]["added_total"] == 1


# -- one owner per queue --------------------------------------------------------------------


def test_a_queue_reported_by_two_brokers_counts_once_under_its_slot_owner() -> None:
    book = StatsBook(Clock())
    # Mid-handoff: b1 still reports the queue it froze, b2 already serves it.
    beat(book, "b1", hot=qstats(added=500, completed=400, waiting=100), a=qstats(added=1))
    beat(book, "b2", hot=qstats(added=510, completed=420, waiting=90))
    stats = book.view(topology(hot="b2")).to_json()
    assert "hot" not in stats["brokers"]["b1"]["queues"]
    assert stats["brokers"]["b2"]["queues"]["hot"]["added_total"] == 510
    assert stats["totals"]["added_total"] == 511
    assert stats["totals"]["waiting"] == 90

    # Before the commit the topology still names b1: b1's entry counts.
    stats = book.view(topology(hot="b1")).to_json()
    assert stats["brokers"]["b1"]["queues"]["hot"]["added_total"] == 500
    assert "hot" not in stats["brokers"]["b2"]["queues"]
    assert stats["totals"]["added_total"] == 501


def test_an_override_decides_the_owner_too() -> None:
    book = StatsBook(Clock())
    beat(book, "b1", pinned=qstats(added=5))
    beat(book, "b2", pinned=qstats(added=6))
    topo = topology()
    topo.overrides["pinned"] = ("b2", 3)
    assert "pinned" in book.view(topo).brokers["b2"].queues


def test_while_the_owner_has_not_reported_a_queue_its_freshest_copy_counts() -> None:
    book = StatsBook(Clock())
    beat(book, "b1", hot=qstats(added=500))
    beat(book, "b2", hot=qstats(added=510))
    beat(book, "b3", other=qstats(added=1))
    stats = book.view(topology(brokers=("b1", "b2", "b3"), hot="b3")).to_json()
    assert stats["brokers"]["b2"]["queues"]["hot"]["added_total"] == 510
    assert stats["totals"]["added_total"] == 511


def test_a_handoff_does_not_turn_the_moved_counters_into_a_rate_spike() -> None:
    clock = Clock()
    book = StatsBook(clock)
    beat(book, "b1", q=qstats(added=10_000, completed=9_000))
    beat(book, "b2", x=qstats())
    clock.now += 1.0
    beat(book, "b1", q=qstats(added=10_100, completed=9_100))
    clock.now += 0.5
    beat(book, "b2", x=qstats(), q=qstats(added=10_150, completed=9_200))  # moved in
    q = book.view(topology(q="b2")).to_json()["brokers"]["b2"]["queues"]["q"]
    assert (q["added_per_s"], q["completed_per_s"]) == (100.0, 200.0)


def test_a_queue_that_moves_back_is_measured_against_its_last_report_anywhere() -> None:
    clock = Clock()
    book = StatsBook(clock)
    beat(book, "b1", q=qstats(added=100), a=qstats())
    clock.now += 1.0
    beat(book, "b2", q=qstats(added=200))  # b1 -> b2
    beat(book, "b1", a=qstats())
    clock.now += 1.0
    beat(book, "b1", q=qstats(added=260), a=qstats())  # b2 -> b1 again
    q = book.view(topology()).to_json()["brokers"]["b1"]["queues"]["q"]
    assert q["added_per_s"] == 60.0


# -- shapes ---------------------------------------------------------------------------------


def test_stats_json_has_exactly_the_design_shape() -> None:
    clock = Clock()
    book = StatsBook(clock)
    beat(book, "b1", a=qstats(added=3, completed=2, failed=1))
    clock.now += 1.0
    beat(book, "b1", a=qstats(added=6, completed=4, failed=1, p99_ms=12.5))
    stats = book.view(topology()).to_json()
    assert set(stats) == {"epoch", "brokers", "totals"}
    assert stats["epoch"] == 7
    assert list(stats["brokers"]) == ["b1", "b2"]
    assert set(stats["brokers"]["b1"]) == {"state", "queues", "totals"}
    assert set(stats["brokers"]["b1"]["queues"]["a"]) == QUEUE_KEYS
    assert set(stats["brokers"]["b1"]["totals"]) == QUEUE_KEYS
    assert set(stats["totals"]) == QUEUE_KEYS
    assert stats["brokers"]["b1"]["queues"]["a"] == {
        "waiting": 0, "delayed": 0, "active": 0, "completed": 4, "failed": 1,
        "added_total": 6, "completed_total": 4, "failed_total": 1,
        "added_per_s": 3.0, "completed_per_s": 2.0, "p99_ms": 12.5}
    assert stats["totals"]["p99_ms"] == 12.5


def test_malformed_queue_stats_are_skipped_not_raised() -> None:
    book = StatsBook(Clock())
    book.observe("b1", {"queues": {"ok": qstats(added=2), "bad": "x", "worse": None,
                                   "odd": {"waiting": True, "added_total": -4,
                                           "completed_total": float("nan"), "p99_ms": "1"}}})
    queues = book.view(topology()).to_json()["brokers"]["b1"]["queues"]
    assert set(queues) == {"ok", "odd"}
    assert queues["odd"]["waiting"] == queues["odd"]["added_total"] == 0
    assert queues["odd"]["completed_total"] == 0
    assert queues["odd"]["p99_ms"] is None


def test_metrics_have_every_design_series_and_the_cluster_sums() -> None:
    clock = Clock()
    book = StatsBook(clock)
    beat(book, "b1", a=qstats(added=10, completed=7, failed=1, waiting=2),
         b=qstats(added=5, completed=5))
    beat(book, "b2", c=qstats(added=20, completed=11, waiting=9, active=1))
    text = render(book.view(topology(c="b2"))).decode()
    m = metrics_of(text)
    for counter in ("added", "completed", "failed", "retried", "stalled"):
        per_broker = {k: v for k, v in m.items() if k[0] == f"shardq_jobs_{counter}_total"}
        assert {dict(k[1])["broker"] for k in per_broker} == {"b1", "b2"}
        assert m[(f"shardq_cluster_jobs_{counter}_total", ())] == sum(per_broker.values())
    assert m[("shardq_cluster_jobs_completed_total", ())] == 23
    assert m[("shardq_queue_jobs", (("broker", "b2"), ("queue", "c"), ("state", "waiting")))] == 9
    assert m[("shardq_cluster_queue_jobs", (("state", "waiting"),))] == 11
    assert m[("shardq_cluster_queue_jobs", (("state", "active"),))] == 1
    assert m[("shardq_coordinator_epoch", ())] == 7
    assert "# TYPE shardq_jobs_completed_total counter" in text


# -- a real coordinator ----------------------------------------------------------------------


def test_a_coordinator_serves_stats_and_metrics_from_heartbeats(
        procs: list[Proc], tmp_path: Path) -> None:
    coord = start_coordinator(procs, tmp_path, "--expect", "2", "--heartbeat-timeout-ms", "800")
    with client(coord) as c:
        register(c, "b1", 7101)
        register(c, "b2", 7102)
        topo = Topology.from_dict(c.get("/topology").json())
        q1 = next(f"q{i}" for i in range(1000) if topo.owner_of(f"q{i}") == "b1")
        q2 = next(f"q{i}" for i in range(1000) if topo.owner_of(f"q{i}") == "b2")

        def hb(bid: str, q: str, n: int) -> None:
            r = c.post("/brokers/heartbeat",
                       json={"id": bid, "stats": {"queues": {q: qstats(added=n, completed=n)}}})
            assert r.status_code == 200, r.text

        hb("b1", q1, 100)
        hb("b2", q2, 1000)
        time.sleep(0.3)
        hb("b1", q1, 200)
        hb("b2", q2, 2000)
        stats = c.get("/stats").json()
        assert stats["epoch"] == topo.epoch
        assert stats["totals"]["completed_total"] == 2200
        assert stats["brokers"]["b2"]["queues"][q2]["completed_per_s"] > 1000
        r = c.get("/metrics")
        assert r.headers["content-type"].startswith("text/plain")
        m = metrics_of(r.text)
        assert m[("shardq_cluster_jobs_completed_total", ())] == 2200
        assert m[("shardq_jobs_completed_total", (("broker", "b2"), ("queue", q2)))] == 2000

        def b2_dead() -> bool:  # b1 keeps beating; b2 went silent
            hb("b1", q1, 300)
            return bool(c.get("/stats").json()["brokers"]["b2"]["state"] == "dead")

        wait_until(b2_dead, timeout=10.0, what="b2 marked dead")
        stats = c.get("/stats").json()
        assert stats["brokers"]["b2"]["queues"][q2]["completed_per_s"] == 0
        assert stats["totals"]["completed_total"] == 2300
        m = metrics_of(c.get("/metrics").text)
        assert m[("shardq_broker_up", (("broker", "b2"),))] == 0
        assert ("shardq_jobs_completed_total", (("broker", "b2"), ("queue", q2))) not in m

        r = c.post("/brokers/b2/forget", json={"accept_data_loss": True})
        assert r.status_code == 200, r.text
        stats = c.get("/stats").json()
        assert list(stats["brokers"]) == ["b1"]
        assert stats["totals"]["completed_total"] == 300
        text = c.get("/metrics").text
        assert 'broker="b2"' not in text
        assert metrics_of(text)[("shardq_cluster_jobs_completed_total", ())] == 300


def test_stats_and_metrics_need_the_token_like_every_route(
        procs: list[Proc], tmp_path: Path) -> None:
    coord = start_coordinator(procs, tmp_path, "--token", "s3cret")
    with client(coord) as anon, client(coord, "s3cret") as ok:
        assert anon.get("/stats").status_code == 401
        assert anon.get("/metrics").status_code == 401
        assert ok.get("/stats").json() == {"epoch": 0, "brokers": {}, "totals": {
            **dict.fromkeys(QUEUE_KEYS - {"p99_ms"}, 0), "p99_ms": None}}
        assert ok.get("/metrics").status_code == 200


# -- the Grafana dashboard ------------------------------------------------------------------

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "shardq-dashboard.json"
# Series only the brokers' own /metrics (--metrics-port) export (broker/metrics.py).
BROKER_ONLY = {"shardq_handoffs_total", "shardq_commit_seconds_sum", "shardq_commit_seconds_count",
               "shardq_job_duration_seconds_bucket"}


def test_the_grafana_dashboard_queries_only_series_that_exist() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    book = StatsBook(Clock())
    beat(book, "b1", q=qstats(added=1))
    exported = {s.name for fam in text_string_to_metric_families(
        render(book.view(topology())).decode()) for s in fam.samples}
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in variables.values() if "definition" in v]
    used = {n for e in exprs for n in re.findall(r"\bshardq_[a-z_]+", e)}
    assert used - exported - BROKER_ONLY == set()
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("cluster throughput", "per broker", "depth", "top 10", "handoffs", "commit"):
        assert topic in titles
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
