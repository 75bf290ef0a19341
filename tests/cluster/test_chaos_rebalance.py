"""Chaos: scale out, drain and scale in while producers and workers run flat out.

docs/design.md §9.2-9.4: every pushed job is completed exactly once across the
moves (checked with each broker's ack journal), none is lost, and clients
only ever see transient TRYAGAIN/MOVED, which they handle themselves.
"""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import shardq
from tests.cluster.conftest import http_get, poll
from tests.conftest import Proc

QUEUES = [f"chaos-{i}" for i in range(100)]
PRODUCERS = 4
WORKERS = 4
MAX_PER_PRODUCER = 4000
STEP_TIMEOUT_S = 120.0


class Load:
    """Producers that record every answered add, workers that count every run."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answered: set[tuple[str, str]] = set()
        self.attempted: set[tuple[str, str]] = set()
        self.handled: collections.Counter[tuple[str, str]] = collections.Counter()
        self.errors: list[BaseException] = []
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[Any]] = []
        self.clients: list[shardq.Client] = []
        self.workers: list[Any] = []

    async def start(self) -> None:
        for p in range(PRODUCERS):
            client = await shardq.connect(self.url)
            self.clients.append(client)
            self.tasks.append(asyncio.create_task(self._produce(client, p)))
        for _ in range(WORKERS):
            client = await shardq.connect(self.url)
            self.clients.append(client)
            worker = client.worker(QUEUES, self._handle, concurrency=25)
            self.workers.append(worker)
            self.tasks.append(asyncio.create_task(worker.run()))

    async def _produce(self, client: shardq.Client, p: int) -> None:
        for i in range(MAX_PER_PRODUCER):
            if self.stop.is_set():
                return
            q = QUEUES[(i * 7 + p) % len(QUEUES)]
            jid = f"p{p}-{i}"
            self.attempted.add((q, jid))
            try:
                await client.queue(q).add("job", {"i": i}, job_id=jid)
            except shardq.ShardqError as exc:
                self.errors.append(exc)
                await asyncio.sleep(0.05)
                continue
            self.answered.add((q, jid))

    async def _handle(self, job: Any) -> str:
        self.handled[(job.queue, job.id)] += 1
        return "ok"

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks[:PRODUCERS])
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while not self.answered <= self.handled.keys():
            assert time.monotonic() < deadline, (
                f"{len(self.answered - self.handled.keys())} answered jobs never ran")
            await asyncio.sleep(0.1)
        for w in self.workers:
            await w.close()
        await asyncio.gather(*self.tasks[PRODUCERS:])
        for c in self.clients:
            await c.aclose()

    async def abort(self) -> None:
        """After a failed step: stop everything and close every connection,
        so the test reports its own failure, not leaked transports."""
        self.stop.set()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for c in self.clients:
            await c.aclose()


async def until(cond: Any, what: str, timeout: float = STEP_TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(cond)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


def broker_states(url: str) -> dict[str, tuple[str, int]]:
    status = http_get(url, "/status") or {"brokers": []}
    return {b["id"]: (b["state"], b["slots"]) for b in status["brokers"]}


def rebalance_idle(url: str) -> bool:
    r = http_get(url, "/rebalance")
    return bool(r) and not r.get("running") and not r.get("moves_in_flight")


def post(url: str, path: str) -> Any:
    """POST to the coordinator and return its JSON answer."""
    r = httpx.post(url + path, json={}, timeout=30)
    assert r.status_code < 300, r.text
    return r.json()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_scale_out_drain_and_scale_in_under_load_lose_and_double_nothing(
        procs: list[Proc], start_broker: Any, tmp_path: Path) -> None:
    coord = Proc(["coordinator", "--port", "0", "--data-dir", str(tmp_path / "coord"),
                  "--expect", "3"], log_path=tmp_path / "coord.log")
    procs.append(coord)
    url = f"http://{coord.addr}"
    journals = {}
    brokers: dict[str, Proc] = {}

    def start(bid: str) -> None:
        journals[bid] = tmp_path / f"acks-{bid}.tsv"
        brokers[bid] = start_broker(bid, "--coordinator", url,
                                    env={"SHARDQ_ACK_JOURNAL": str(journals[bid])})

    for bid in ("b1", "b2", "b3"):
        start(bid)
    poll(lambda: all(s[1] > 0 for s in broker_states(url).values())
         and len(broker_states(url)) == 3, "bootstrap")

    async def scenario() -> Load:
        load = Load(url)
        await load.start()
        try:
            await until(lambda: len(load.answered) > 1500, "load to get going")
            # Scale out 3 -> 5: joining brokers get about 2/5 of the slots.
            start("b4")
            start("b5")
            await until(lambda: all(broker_states(url).get(b, ("", 0))[1] > 0 for b in ("b4", "b5"))
                        and rebalance_idle(url), "scale out to finish")
            # Drain two of the original brokers.
            post(url, "/brokers/b1/drain")
            post(url, "/brokers/b2/drain")
            await until(lambda: all(broker_states(url).get(b) == ("drained", 0)
                                    for b in ("b1", "b2")), "b1 and b2 to drain")
            # Scale in to 2: b3 leaves too; the drained ones stop.
            post(url, "/brokers/b3/drain")
            await until(lambda: broker_states(url).get("b3") == ("drained", 0), "b3 to drain")
            for bid in ("b1", "b2", "b3"):
                assert brokers[bid].terminate() == 0
                r = httpx.post(f"{url}/brokers/leave", json={"id": bid}, timeout=30)
                assert r.status_code < 300, r.text
            await until(lambda: len(load.answered) > 6000 or load.stop.is_set(), "more load")
            await load.finish()
            return load
        except BaseException:
            await load.abort()  # close its connections before the loop goes
            raise

    async def bounded() -> Load:
        async with asyncio.timeout(600):
            return await scenario()

    load = asyncio.run(bounded())
    assert not load.errors, f"clients saw errors: {load.errors[:5]}"
    assert load.answered, "nothing was pushed"
    assert load.answered <= load.handled.keys(), "an answered job was lost"
    assert load.handled.keys() <= load.attempted
    doubles = {k: n for k, n in load.handled.items() if n > 1}
    assert not doubles, f"jobs run twice: {list(doubles.items())[:5]}"
    acks: collections.Counter[tuple[str, str]] = collections.Counter()
    for path in journals.values():
        if path.exists():
            for line in path.read_text().splitlines():
                q, jid, _ = line.split("\t")
                acks[(q, jid)] += 1
    assert {k for k, n in acks.items() if n > 1} == set(), "an ack was accepted twice"
    assert set(acks) == set(load.handled), "every run job was acked exactly once"
    final = broker_states(url)
    owners = {b for b, (state, slots) in final.items() if slots > 0}
    assert owners == {"b4", "b5"}, final
    assert sum(s for _, s in final.values()) == 4096
