"""Flows against real broker processes (one broker; the cross-broker cases
are in tests/cluster/test_flows_cluster.py): the parent runs once after its
children, sees their results, and the outbox survives kill -9."""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import shardq
from shardq.errors import BadRequestError
from tests.aio import run, running, until
from tests.integration.rawwire import RawConn

FLOW = {"queue": "report", "name": "merge", "data": {"r": 1},
        "children": [{"queue": "pages", "name": "render", "data": {"p": i}} for i in range(3)]}


class Recorder:
    """Handlers for `pages` (children) and `report` (parent) that count runs."""

    def __init__(self, fail_page: int | None = None) -> None:
        self.runs: collections.Counter[str] = collections.Counter()
        self.values: list[dict[str, Any]] = []
        self.fail_page = fail_page

    async def page(self, job: shardq.Job) -> Any:
        self.runs[job.id] += 1
        if job.data["p"] == self.fail_page:
            raise RuntimeError("no ink")
        return {"page": job.data["p"]}

    async def report(self, job: shardq.Job) -> Any:
        self.runs[job.id] += 1
        self.values.append(await job.children_values())
        return "merged"


def test_a_flow_parent_runs_once_after_its_children_with_their_results(start_broker) -> None:  # type: ignore[no-untyped-def]
    b = start_broker("b1")

    async def main() -> None:
        async with await shardq.connect(b.addr) as client:
            rec = Recorder()
            pid = await client.add_flow(FLOW)
            report = client.queue("report")
            assert (await report.get_job(pid))["state"] == "waiting-children"
            async with running(client.worker("report", rec.report)), \
                    running(client.worker("pages", rec.page, concurrency=3)):
                await until(lambda: rec.values != [])
                await until(_state_is(report, pid, "completed"))
            assert rec.runs[pid] == 1 and len(rec.runs) == 4
            assert set(rec.runs.values()) == {1}
            [values] = rec.values
            assert sorted(values.values(), key=lambda v: v["page"]) == [
                {"page": 0}, {"page": 1}, {"page": 2}]
            assert all(k.startswith("pages:") for k in values)
            job = await report.get_job(pid)
            assert job["children"] == {"flow": job["children"]["flow"], "total": 3, "done": 3}

    run(main())


def _state_is(q: shardq.Queue, jid: str, state: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        job = await q.get_job(jid)
        return job is not None and job["state"] == state

    return check


def test_a_child_failing_for_good_fails_the_parent(start_broker) -> None:  # type: ignore[no-untyped-def]
    b = start_broker("b1")

    async def main() -> None:
        async with await shardq.connect(b.addr) as client:
            rec = Recorder(fail_page=1)
            pid = await client.add_flow(FLOW)
            report = client.queue("report")
            async with running(client.worker("pages", rec.page, concurrency=3)), \
                    running(client.worker("report", rec.report)):
                await until(_state_is(report, pid, "failed"))
            job = await report.get_job(pid)
            assert job["failed_reason"].startswith("child pages:")
            assert job["failed_reason"].endswith("failed: no ink")
            assert rec.runs[pid] == 0

    run(main())


def test_bad_flows_get_clear_errors_and_harm_nothing(start_broker) -> None:  # type: ignore[no-untyped-def]
    b = start_broker("b1")

    async def main() -> None:
        async with await shardq.connect(b.addr) as client:
            with pytest.raises(ValueError, match="children"):
                await client.add_flow({"queue": "r", "name": "m", "children": []})
            with pytest.raises(ValueError, match="one level"):
                await client.add_flow({"queue": "r", "name": "m", "children": [
                    {"queue": "c", "name": "x", "children": [{"queue": "d", "name": "y"}]}]})
            with pytest.raises(BadRequestError, match="not a flow's parent"):
                jid = await client.queue("plain").add("x", 1)
                await client._call("plain", "FLOW_CHILDREN", {"queue": "plain", "id": jid})
            assert (await client.queue("pages").counts())["waiting"] == 0

    run(main())
    conn = RawConn(b.addr)
    try:
        for args in ({"queue": "q", "flow": "", "deadline": 1, "parent": ["p", "i"], "jobs": []},
                     {"queue": "q", "flow": "f", "deadline": -1, "parent": ["p", "i"], "jobs": []},
                     {"queue": "q", "flow": "f", "deadline": 10**14, "parent": "p", "jobs": []}):
            assert conn.call("FLOW_ADD_CHILDREN", args)[1] == "BAD_REQUEST"
        late = conn.call("FLOW_ADD_PARENT", {"queue": "q", "flow": "f", "deadline": 1,
                                             "children": 1, "job": ["p", "n", b"\xc0", None]})
        assert late[1] == "BAD_REQUEST" and "deadline" in str(late[2])
        status, body, _ = conn.call("FLOW_CHILD_DONE", {"items": [["q", "i", "f", "k"]]})[1:]
        assert status == "ok" and body[0][0] == "BAD_REQUEST"
        assert conn.ok("PING", {}) == "pong"
    finally:
        conn.close()


@pytest.mark.parametrize("point", ["broker.before_flow_deliver"])
def test_a_completed_childs_outbox_survives_kill_9_and_is_delivered_after_restart(
        start_broker, tmp_path, point: str) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "b1-data"
    b = start_broker("b1", data_dir=data, env={"SHARDQ_FAILPOINTS": f"{point}=kill"})

    async def first() -> str:
        async with await shardq.connect(b.addr) as client:
            pid = await client.add_flow({**FLOW, "children": FLOW["children"][:1]})
            async with running(client.worker("pages", Recorder().page)):
                await until(lambda: not b.alive())
            return pid

    pid = run(first())
    b.popen.wait(timeout=10)
    b2 = start_broker("b1", data_dir=data)

    async def second() -> None:
        async with await shardq.connect(b2.addr) as client:
            rec = Recorder()
            report = client.queue("report")
            async with running(client.worker("report", rec.report)):
                await until(_state_is(report, pid, "completed"))
            assert rec.runs[pid] == 1
            assert list(rec.values[0].values()) == [{"page": 0}]

    run(second())
