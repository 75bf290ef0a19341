"""Scheduler tick math and the queue's firing, with the clock passed in."""

from __future__ import annotations

import calendar
from typing import Any

import pytest

from shardq.broker import schedule
from shardq.broker.queue import QueueDefaults, QueueState
from shardq.broker.replay import QueueImage, apply_op
from shardq.errors import BadRequestError


def q() -> QueueState:
    return QueueState("q", 1, [], QueueDefaults())


def sched(**kw: Any) -> dict[str, Any]:
    spec = schedule.validate(kw)
    spec.update(id="s", name="tick", data=b"\xc0", opts=None)
    return spec


@pytest.mark.parametrize("bad", [
    {}, {"every_ms": 100, "cron": "* * * * *"}, {"every_ms": 1}, {"every_ms": "1000"},
    {"cron": "61 * * * *"}, {"cron": "* * * *"}, {"cron": "every minute"},
    {"cron": "* * * * *", "tz": "Mars/Olympus"},
])
def test_bad_schedules_are_refused_with_a_clear_error(bad: dict[str, Any]) -> None:
    with pytest.raises(BadRequestError):
        schedule.validate(bad)


def test_every_ms_ticks_fall_on_multiples_since_the_epoch() -> None:
    s = sched(every_ms=200)
    assert schedule.next_tick(s, 1_000) == 1_200
    assert schedule.next_tick(s, 1_199) == 1_200
    assert schedule.next_tick(s, 1_200) == 1_400


def test_cron_ticks_follow_the_time_zone() -> None:
    s = sched(cron="0 9 * * *", tz="Europe/Paris")
    jan_1_utc_midnight = calendar.timegm((2026, 1, 1, 0, 0, 0)) * 1000
    # 09:00 in Paris in winter is 08:00 UTC.
    assert schedule.next_tick(s, jan_1_utc_midnight) == jan_1_utc_midnight + 8 * 3_600_000


def test_each_tick_makes_exactly_one_job_and_advances_in_the_same_batch() -> None:
    queue = q()
    queue.upsert_scheduler(sched(every_ms=200), now=1_050)
    assert queue.schedulers["s"]["next_tick_ms"] == 1_200
    assert queue.fire_schedulers(1_199) == 0
    queue.log.clear()
    assert queue.fire_schedulers(1_200) == 1
    assert [op[0] for op in queue.log] == ["A", "SN"]  # one group commit holds both
    assert "s:1200" in queue.jobs
    assert queue.fire_schedulers(1_300) == 0
    assert queue.fire_schedulers(1_400) == 1 and "s:1400" in queue.jobs


def test_after_downtime_only_the_latest_missed_tick_fires() -> None:
    queue = q()
    queue.upsert_scheduler(sched(every_ms=200), now=1_050)
    assert queue.fire_schedulers(5_130) == 1
    assert [j for j in queue.jobs if j.startswith("s:")] == ["s:5000"]
    assert queue.schedulers["s"]["next_tick_ms"] == 5_200


def test_a_tick_job_that_exists_is_not_made_twice() -> None:
    queue = q()
    queue.upsert_scheduler(sched(every_ms=200), now=1_050)
    queue.add("s:1200", "tick", b"", None, now=1_100)  # e.g. made by a previous owner
    assert queue.fire_schedulers(1_200) == 0
    assert queue.schedulers["s"]["next_tick_ms"] == 1_400


def test_schedulers_survive_replay_and_export() -> None:
    queue = q()
    queue.upsert_scheduler(sched(every_ms=200), now=1_050)
    queue.fire_schedulers(1_200)
    images = {"q": QueueImage()}
    for op in queue.log:
        apply_op(images, list(op))
    assert images["q"].meta["schedulers"]["s"]["next_tick_ms"] == 1_400
    chunks = list(queue.export_chunks())
    assert chunks[0]["meta"]["schedulers"]["s"]["next_tick_ms"] == 1_400
    assert queue.remove_scheduler("s") and not queue.remove_scheduler("s")
    apply_op(images, list(queue.log[-1]))
    assert images["q"].meta["schedulers"] == {}
