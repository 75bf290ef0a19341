"""The one connection pool (client/pool.py) with in-memory channels, and the
one coordinator HTTP client's settings (shardq/coordinator_http.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shardq import coordinator_http
from shardq.client.pool import ConnectionPool
from shardq.errors import ConnectionClosedError
from tests.aio import run


class FakeChannel:
    def __init__(self, addr: str) -> None:
        self.addr, self.broker_id, self.max_epoch = addr, "", 0
        self._closed = False
        self.drained = False

    @property
    def closed(self) -> bool:
        return self._closed

    def request(self, op: str, args: Any, timeout: float | None = None) -> asyncio.Future[Any]:
        raise AssertionError("not used")

    async def wait_writable(self) -> None:
        return None

    async def drain_close(self) -> None:
        self.drained = self._closed = True

    async def aclose(self) -> None:
        self._closed = True


def make_pool() -> tuple[ConnectionPool, list[str]]:
    dials: list[str] = []

    async def connector(addr: str) -> Any:
        dials.append(addr)
        await asyncio.sleep(0)  # concurrent callers overlap here
        return FakeChannel(addr)

    return ConnectionPool(connector), dials


def test_concurrent_callers_share_one_dial_per_key_and_lane() -> None:
    async def main() -> None:
        pool, dials = make_pool()
        a, b = await asyncio.gather(pool.get("b1", "h:1"), pool.get("b1", "h:1"))
        assert a is b and dials == ["h:1"]
        pulls = await pool.get("b1", "h:1", lane="pulls")
        assert pulls is not a and dials == ["h:1", "h:1"]
        assert pool.open_channels() == [a]  # the shared lane only

    run(main())


def test_a_broken_link_or_a_new_address_is_dialed_again() -> None:
    async def main() -> None:
        pool, dials = make_pool()
        first = await pool.get("b1", "h:1")
        await first.aclose()
        second = await pool.get("b1", "h:1")
        assert second is not first
        moved = await pool.get("b1", "h:9")
        assert moved.addr == "h:9" and second.closed
        assert dials == ["h:1", "h:1", "h:9"]

    run(main())


def test_a_closed_lane_drains_its_links_and_refuses_new_ones() -> None:
    async def main() -> None:
        pool, _ = make_pool()
        shared = await pool.get("b1", "h:1")
        pulls = await pool.get("b1", "h:1", lane="pulls")
        await pool.close_lane("pulls")
        assert isinstance(pulls, FakeChannel) and pulls.drained
        with pytest.raises(ConnectionClosedError):
            await pool.get("b1", "h:1", lane="pulls")
        assert not shared.closed and await pool.get("b1", "h:1") is shared

    run(main())


def test_dial_is_uncached_and_refused_once_the_pool_is_closed() -> None:
    async def main() -> None:
        pool, dials = make_pool()
        own = await pool.dial("h:2")
        assert pool.cached("h:2") is None and dials == ["h:2"]
        cached = await pool.get("b1", "h:1")
        await pool.aclose()
        assert cached.closed and not own.closed  # the caller closes its own
        with pytest.raises(ConnectionClosedError):
            await pool.dial("h:2")
        with pytest.raises(ConnectionClosedError):
            await pool.get("b1", "h:1")

    run(main())


def test_drop_closes_a_link_in_doubt_and_the_next_get_dials() -> None:
    async def main() -> None:
        pool, dials = make_pool()
        first = await pool.get("h:1", "h:1", lane="flows")
        await pool.drop("h:1", lane="flows")
        assert first.closed
        assert await pool.get("h:1", "h:1", lane="flows") is not first
        assert len(dials) == 2

    run(main())


def test_adopt_keeps_an_open_link_and_refuses_a_second() -> None:
    async def main() -> None:
        pool, dials = make_pool()
        seed = FakeChannel("h:1")
        assert pool.adopt("b1", seed)
        assert not pool.adopt("b1", FakeChannel("h:1"))
        assert await pool.get("b1", "h:1") is seed and dials == []

    run(main())


def test_the_coordinator_http_client_carries_base_url_timeout_and_bearer() -> None:
    async def main() -> None:
        async with coordinator_http.async_client("http://c:7070/", "s3cret", timeout_s=2.5) as h:
            assert str(h.base_url) == "http://c:7070"
            assert h.headers["Authorization"] == "Bearer s3cret"
            assert h.timeout.read == 2.5
    run(main())
    with coordinator_http.sync_client("http://c:7070", None) as h:
        assert "Authorization" not in h.headers
        assert h.timeout.read == coordinator_http.DEFAULT_TIMEOUT_S
