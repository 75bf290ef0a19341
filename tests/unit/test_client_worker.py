"""Worker logic over an in-memory fake broker: slots, ack-and-fetch, failures, close."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any

import msgpack

from shardq.client import Client
from shardq.router import Topology
from tests.aio import run


class FakeBroker:
    """Just enough of a broker for one queue: PULL (long poll), ACK(+pull), FAIL, EXTEND."""

    def __init__(self, n_jobs: int) -> None:
        self.waiting = collections.deque(f"j{i}" for i in range(n_jobs))
        self.tokens: dict[str, int] = {}
        self.acked: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self.stacktraces: dict[str, str] = {}  # FAIL's optional 5th element
        self.frames: list[tuple[str, int]] = []  # (op, items or count)
        self.parked: list[tuple[asyncio.Future[Any], int]] = []
        self.next_token = 1
        self.all_acked = asyncio.Event()  # every job acked
        self.all_failed = asyncio.Event()  # every job failed
        self._n_jobs = n_jobs

    def _take(self, count: int) -> list[Any]:
        out = []
        while self.waiting and len(out) < count:
            jid = self.waiting.popleft()
            self.tokens[jid] = tok = self.next_token
            self.next_token += 1
            out.append(["q", jid, "n", msgpack.packb({"id": jid}), tok, 0, 1, 0, 1000])
        return out

    def handle(self, op: str, args: Any) -> Any:
        loop = asyncio.get_running_loop()
        if op == "PULL":
            self.frames.append((op, args["count"]))
            jobs = self._take(args["count"])
            if jobs:
                return jobs
            fut: asyncio.Future[Any] = loop.create_future()
            self.parked.append((fut, args["count"]))
            loop.call_later(args["wait_ms"] / 1000, lambda: fut.done() or fut.set_result([]))
            return fut
        items = args["items"]
        self.frames.append((op, len(items)))
        out = []
        for _q, jid, tok, val, *stack in items:
            if self.tokens.get(jid) != tok:
                out.append(["LOCK_LOST", "stale"])
                continue
            if op == "ACK":
                self.acked.append(jid)
            elif op == "FAIL":
                self.failed.append((jid, val))
                if stack:
                    self.stacktraces[jid] = stack[0]
            out.append(None)
        if len(self.acked) >= self._n_jobs:
            self.all_acked.set()
        if len(self.failed) >= self._n_jobs:
            self.all_failed.set()
        if op == "ACK" and "pull" in args:
            return {"acks": out, "jobs": self._take(args["pull"]["count"])}
        return out


class FakeConn:
    def __init__(self, broker: FakeBroker) -> None:
        self.broker, self.addr, self.broker_id, self.max_epoch = broker, "h:1", "b1", 0
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def request(self, op: str, args: Any, timeout: float | None = None) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        out: asyncio.Future[Any] = loop.create_future()
        res = self.broker.handle(op, args)
        if isinstance(res, asyncio.Future):
            def relay(f: asyncio.Future[Any]) -> None:
                if not out.done():
                    out.set_result(f.result())
            res.add_done_callback(relay)
        else:
            loop.call_soon(lambda: out.done() or out.set_result(res))
        return out

    async def wait_writable(self) -> None:
        return None

    async def drain_close(self) -> None:
        self._closed = True

    async def aclose(self) -> None:
        self._closed = True


async def make_client(broker: FakeBroker) -> Client:
    async def connector(addr: str) -> Any:
        return FakeConn(broker)

    client = Client(seeds=["h:1"], connector=connector)
    client._topology.replace(Topology.standalone("b1", "h:1"))
    return client



async def reached(event: asyncio.Event, what: str, timeout: float = 10.0) -> None:
    """Wait for `event`; fail naming `what` after `timeout` s."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


class Starts:
    """Counts handler starts; `reached(starts.n(k))` waits for the k-th."""

    def __init__(self) -> None:
        self.count = 0
        self._events: dict[int, asyncio.Event] = {}

    def n(self, k: int) -> asyncio.Event:
        ev = self._events.setdefault(k, asyncio.Event())
        if self.count >= k:
            ev.set()
        return ev

    def started(self) -> None:
        self.count += 1
        for k, ev in self._events.items():
            if self.count >= k:
                ev.set()


def test_slots_bound_concurrency_and_acks_refill_by_ack_and_fetch() -> None:
    async def main() -> None:
        broker = FakeBroker(500)
        client = await make_client(broker)
        running = [0]
        peak = [0]

        async def handle(job: Any) -> Any:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            await asyncio.sleep(0.001)  # the work, so handlers overlap
            running[0] -= 1
            return job.data["id"]

        worker = client.worker("q", handle, concurrency=10, wait_ms=50)
        task = asyncio.create_task(worker.run())
        await reached(broker.all_acked, "500 acks")
        await worker.close()
        await task
        assert peak[0] == 10
        assert sorted(broker.acked) == sorted(f"j{i}" for i in range(500))
        pulls = [n for op, n in broker.frames if op == "PULL"]
        acks = [n for op, n in broker.frames if op == "ACK"]
        # the refill rides on acks: far fewer PULL frames than jobs, acks batched
        assert len(pulls) < 25
        assert len(acks) < 250
        await client.aclose()

    run(main())


def test_handler_errors_become_fail_items_with_the_reason() -> None:
    async def main() -> None:
        broker = FakeBroker(3)
        client = await make_client(broker)

        async def handle(job: Any) -> None:
            raise ValueError(f"no {job.id}")

        worker = client.worker("q", handle, concurrency=3, wait_ms=50)
        task = asyncio.create_task(worker.run())
        await reached(broker.all_failed, "3 fails")
        await worker.close()
        await task
        assert sorted(broker.failed) == [("j0", "no j0"), ("j1", "no j1"), ("j2", "no j2")]
        for jid, text in broker.stacktraces.items():
            assert "in handle" in text and text.endswith(f"ValueError: no {jid}\n")
        assert sorted(broker.stacktraces) == ["j0", "j1", "j2"]
        await client.aclose()

    run(main())


def test_a_lost_lock_drops_the_result_and_does_not_count_it() -> None:
    async def main() -> None:
        broker = FakeBroker(1)
        client = await make_client(broker)
        gate, starts = asyncio.Event(), Starts()

        async def handle(job: Any) -> str:
            starts.started()
            await gate.wait()
            return "late"

        worker = client.worker("q", handle, wait_ms=50)
        task = asyncio.create_task(worker.run())
        await reached(starts.n(1), "the handler to start")
        broker.tokens["j0"] = -1  # the broker revoked the token (lock expired)
        gate.set()
        await worker.close()  # finishes the handler and flushes its (refused) ack
        await task
        assert broker.acked == [] and worker.completed == 0
        await client.aclose()

    run(main())


def test_close_waits_for_running_handlers_and_flushes_their_acks() -> None:
    async def main() -> None:
        broker = FakeBroker(4)
        client = await make_client(broker)
        gate, starts = asyncio.Event(), Starts()

        async def handle(job: Any) -> None:
            starts.started()
            await gate.wait()

        worker = client.worker("q", handle, concurrency=4, wait_ms=5000)
        task = asyncio.create_task(worker.run())
        await reached(starts.n(4), "4 handlers running")
        closing = asyncio.create_task(worker.close())
        done, _ = await asyncio.wait({closing}, timeout=0.05)
        assert not done  # handlers still running: close() waits for them
        gate.set()
        await closing
        await task
        assert sorted(broker.acked) == ["j0", "j1", "j2", "j3"]
        await client.aclose()

    run(main())


def test_cancelling_run_cancels_handlers_without_acking() -> None:
    async def main() -> None:
        broker = FakeBroker(2)
        client = await make_client(broker)
        cancelled: list[str] = []
        starts, both_cancelled = Starts(), asyncio.Event()

        async def handle(job: Any) -> None:
            starts.started()
            try:
                await asyncio.Event().wait()  # a handler that never returns by itself
            except asyncio.CancelledError:
                cancelled.append(job.id)
                if len(cancelled) == 2:
                    both_cancelled.set()
                raise

        worker = client.worker("q", handle, concurrency=2, wait_ms=50)
        task = asyncio.create_task(worker.run())
        await reached(starts.n(2), "2 handlers running")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await reached(both_cancelled, "both handlers cancelled")
        assert sorted(cancelled) == ["j0", "j1"]
        assert broker.acked == [] and broker.failed == []
        await worker.close()  # returns at once after run() ended
        await client.aclose()

    run(main())
