"""Routing layer with in-memory channels: grouping, MOVED, TRYAGAIN, BUSY, link loss."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from shardq.client.cluster import Cluster
from shardq.client.retry import RetryPolicy
from shardq.client.topology import TopologyManager
from shardq.errors import (
    AuthError,
    BusyError,
    ConnectionClosedError,
    MovedError,
    ServerError,
    TryAgainError,
    UnavailableError,
)
from shardq.router import Topology, slot_of
from tests.aio import run

FAST = RetryPolicy(tryagain_budget=0.3, tryagain_refresh_after=0.1, busy_budget=0.3,
                   unavailable_budget=0.3, backoff_min=0.005, backoff_max=0.02)


def queue_in(lo: int, hi: int, prefix: str = "q") -> str:
    """A queue name whose slot is in [lo, hi]."""
    i = 0
    while True:
        name = f"{prefix}{i}"
        if lo <= slot_of(name) <= hi:
            return name
        i += 1


Q1 = queue_in(0, 2047)       # on b1
Q2 = queue_in(2048, 4095)    # on b2


def two_brokers(epoch: int = 1) -> Topology:
    return Topology.from_dict({
        "epoch": epoch,
        "brokers": {"b1": {"addr": "h:1"}, "b2": {"addr": "h:2"}},
        "slots": [[0, 2047, "b1", 1], [2048, 4095, "b2", 1]],
    })


Script = Callable[[str, str, Any], Any]


class FakeChannel:
    def __init__(self, addr: str, bid: str, script: Script, log: list[Any]) -> None:
        self.addr, self.broker_id, self.max_epoch = addr, bid, 0
        self.script, self.log = script, log
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def request(self, op: str, args: Any, timeout: float | None = None) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.log.append((self.broker_id, op, args))
        try:
            fut.set_result(self.script(self.broker_id, op, args))
        except Exception as exc:
            fut.set_exception(exc)
        return fut

    async def wait_writable(self) -> None:
        return None

    async def drain_close(self) -> None:
        self._closed = True

    async def aclose(self) -> None:
        self._closed = True


def make_cluster(script: Script, topo: Topology | None = None,
                 down: set[str] | None = None) -> tuple[Cluster, list[Any]]:
    log: list[Any] = []
    ids = {"h:1": "b1", "h:2": "b2", "h:3": "b3"}

    async def connector(addr: str) -> Any:
        if down and addr in down:
            raise ConnectionRefusedError(addr)
        return FakeChannel(addr, ids[addr], script, log)

    tm = TopologyManager(topo or two_brokers(), min_interval=0)
    return Cluster(tm, connector, FAST), log



def add_items(queue_items: list[tuple[str, str]]) -> list[list[Any]]:
    return [[q, jid] for q, jid in queue_items]


def echo_ids(_bid: str, _op: str, args: Any) -> Any:
    return [item[1] for item in args["items"]]


def items_args(_bid: str, sub: list[Any], _rnd: int) -> Any:
    return {"items": sub}


def first(item: list[Any]) -> str:
    return item[0]


def test_call_routes_by_slot_owner() -> None:
    async def main() -> None:
        cluster, log = make_cluster(lambda bid, op, args: bid)
        assert await cluster.call(Q1, "COUNTS", {}) == "b1"
        assert await cluster.call(Q2, "COUNTS", {}) == "b2"
        assert [b for b, _, _ in log] == ["b1", "b2"]

    run(main())


def test_bulk_splits_items_by_owner_and_keeps_their_order() -> None:
    async def main() -> None:
        cluster, log = make_cluster(echo_ids)
        items = add_items([(Q1, "a"), (Q2, "b"), (Q1, "c"), (Q2, "d")])
        out = await cluster.bulk("ACK", items, first, items_args)
        assert out == ["a", "b", "c", "d"]
        frames = {bid: [it[1] for it in args["items"]] for bid, _, args in log}
        assert frames == {"b1": ["a", "c"], "b2": ["b", "d"]}

    run(main())


def test_a_moved_item_is_rerouted_alone_and_the_slot_patched() -> None:
    async def main() -> None:
        slot = slot_of(Q1)

        def script(bid: str, op: str, args: Any) -> Any:
            out: list[Any] = []
            for q, jid in args["items"]:
                if bid == "b1" and q == Q1:
                    out.append(["MOVED", {"slot": slot, "owner": "b3", "addr": "h:3", "epoch": 2}])
                else:
                    out.append(f"{bid}:{jid}")
            return out

        cluster, log = make_cluster(script)
        q1b = queue_in(0, slot - 1, prefix="other") if slot else queue_in(1, 2047, prefix="o")
        items = add_items([(Q1, "a"), (q1b, "b")])
        out = await cluster.bulk("ACK", items, first, items_args)
        assert out == ["b3:a", "b1:b"]
        assert cluster.topology.route(Q1) == ("b3", "h:3")
        resent = [args["items"] for bid, _, args in log if bid == "b3"]
        assert resent == [[[Q1, "a"]]]

    run(main())


def test_whole_frame_moved_is_followed_by_call() -> None:
    async def main() -> None:
        slot = slot_of(Q1)

        def script(bid: str, op: str, args: Any) -> Any:
            if bid == "b1":
                raise MovedError(slot, "b2", "h:2", 2)
            return "ok-from-b2"

        cluster, _ = make_cluster(script)
        assert await cluster.call(Q1, "COUNTS", {}) == "ok-from-b2"

    run(main())


def test_redirects_are_bounded_per_request() -> None:
    async def main() -> None:
        slot = slot_of(Q1)
        hops = {"b1": ("b2", "h:2"), "b2": ("b1", "h:1")}
        epoch = [1]

        def script(bid: str, op: str, args: Any) -> Any:
            if op == "TOPOLOGY":
                return None
            epoch[0] += 1
            owner, addr = hops[bid]
            raise MovedError(slot, owner, addr, epoch[0])

        cluster, log = make_cluster(script)
        with pytest.raises(MovedError):
            await cluster.call(Q1, "COUNTS", {})
        assert len([e for e in log if e[1] == "COUNTS"]) == FAST.max_redirects + 1

    run(main())


def test_tryagain_is_retried_then_succeeds() -> None:
    async def main() -> None:
        answers = [TryAgainError(retry_after_ms=5), TryAgainError(retry_after_ms=5), "done"]

        def script(bid: str, op: str, args: Any) -> Any:
            a = answers.pop(0)
            if isinstance(a, Exception):
                raise a
            return a

        cluster, _ = make_cluster(script)
        assert await cluster.call(Q1, "PAUSE", {}) == "done"

    run(main())


def test_tryagain_past_the_budget_raises_tryagain_error() -> None:
    async def main() -> None:
        def script(bid: str, op: str, args: Any) -> Any:
            raise TryAgainError(retry_after_ms=20)

        cluster, _ = make_cluster(script)
        with pytest.raises(TryAgainError):
            await cluster.call(Q1, "PAUSE", {})

    run(main())


def test_busy_items_are_retried_then_raise_busy_error() -> None:
    async def main() -> None:
        def script(bid: str, op: str, args: Any) -> Any:
            return [["BUSY", {"retry_after_ms": 10}] if jid == "x" else jid
                    for _, jid in args["items"]]

        cluster, log = make_cluster(script)
        out = await cluster.bulk("ADD", add_items([(Q1, "x"), (Q1, "y")]), first, items_args)
        assert out[1] == "y"
        assert isinstance(out[0], BusyError)
        assert len(log) > 2  # x was resent

    run(main())


def test_auth_error_is_raised_at_once() -> None:
    async def main() -> None:
        def script(bid: str, op: str, args: Any) -> Any:
            raise AuthError("no")

        cluster, log = make_cluster(script)
        with pytest.raises(AuthError):
            await cluster.call(Q1, "COUNTS", {})
        assert len(log) == 1

    run(main())


def test_bad_request_item_is_returned_not_retried() -> None:
    async def main() -> None:
        def script(bid: str, op: str, args: Any) -> Any:
            return [["BAD_REQUEST", "nope"] for _ in args["items"]]

        cluster, log = make_cluster(script)
        out = await cluster.bulk("ADD", add_items([(Q1, "a")]), first, items_args)
        assert isinstance(out[0], ServerError) and out[0].code == "BAD_REQUEST"
        assert len(log) == 1

    run(main())


def test_unreachable_owner_raises_unavailable_after_the_budget() -> None:
    async def main() -> None:
        def script(bid: str, op: str, args: Any) -> Any:
            return [None for _ in args["items"]] if op == "ACK" else "ok"

        cluster, _ = make_cluster(script, down={"h:1"})
        with pytest.raises(UnavailableError) as info:
            await cluster.call(Q1, "COUNTS", {})
        assert info.value.broker == "b1"
        out = await cluster.bulk("ACK", add_items([(Q1, "a"), (Q2, "b")]), first, items_args)
        assert isinstance(out[0], UnavailableError)
        assert out[1] is None  # b2's item is done whatever happens to b1's

    run(main())


def test_a_reply_not_aligned_with_the_items_is_an_error() -> None:
    async def main() -> None:
        cluster, _ = make_cluster(lambda bid, op, args: ["only-one"])
        out = await cluster.bulk("ACK", add_items([(Q1, "a"), (Q1, "b")]), first, items_args)
        assert all(isinstance(o, ServerError) for o in out)

    run(main())


def test_link_loss_is_retried_on_a_new_connection() -> None:
    async def main() -> None:
        calls = [0]

        def script(bid: str, op: str, args: Any) -> Any:
            calls[0] += 1
            if calls[0] == 1:
                raise ConnectionClosedError("lost")
            return "ok"

        cluster, _ = make_cluster(script)
        assert await cluster.call(Q1, "COUNTS", {}) == "ok"

    run(main())


def test_unowned_queue_refreshes_and_then_routes() -> None:
    async def main() -> None:
        empty = Topology.empty()
        cluster, _ = make_cluster(lambda bid, op, args: bid, topo=empty)

        async def source() -> Topology:
            return two_brokers(epoch=3)

        cluster.topology.sources = [source]
        assert await cluster.call(Q2, "COUNTS", {}) == "b2"
        assert cluster.topology.epoch == 3

    run(main())
