"""Connection protocol driven with bytes through a fake transport (no sockets)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest

from shardq.client.connection import Connection, split_addr
from shardq.codec import FrameDecoder, encode_frame
from shardq.errors import ConnectionClosedError, MovedError, TooLargeError
from tests.aio import run


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[bytes] = []
        self.writes = 0
        self.closed = False

    def writelines(self, data: Any) -> None:
        self.writes += 1
        self.chunks.extend(data)

    def write(self, data: Any) -> None:
        self.writes += 1
        self.chunks.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def sent_frames(self) -> list[Any]:
        return FrameDecoder().feed(b"".join(self.chunks))



def make(**kw: Any) -> tuple[Connection, FakeTransport]:
    conn = Connection("h:1", **kw)
    t = FakeTransport()
    conn.connection_made(t)
    return conn, t


def test_split_addr() -> None:
    assert split_addr("127.0.0.1:7101") == ("127.0.0.1", 7101)
    assert split_addr("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError):
        split_addr("nohost")


def test_pipelined_requests_are_corked_into_one_write_and_matched_by_id() -> None:
    async def main() -> None:
        conn, t = make()
        f1 = conn.request("PING", {})
        f2 = conn.request("COUNTS", {"queue": "q"})
        await asyncio.sleep(0)
        assert t.writes == 1
        sent = t.sent_frames()
        assert [f[1] for f in sent] == ["PING", "COUNTS"]
        (r1, _, _), (r2, _, _) = sent
        # replies out of order, split at an awkward byte boundary
        data = encode_frame([r2, "ok", {"waiting": 1}, 0]) + encode_frame([r1, "ok", "pong", 0])
        conn.data_received(data[:3])
        conn.data_received(data[3:])
        assert await f1 == "pong"
        assert await f2 == {"waiting": 1}

    run(main())


def test_error_status_becomes_the_typed_exception() -> None:
    async def main() -> None:
        conn, t = make()
        fut = conn.request("ADD", {})
        await asyncio.sleep(0)
        rid = t.sent_frames()[0][0]
        body = {"slot": 7, "owner": "b2", "addr": "h:2", "epoch": 3}
        conn.data_received(encode_frame([rid, "MOVED", body, 2]))
        with pytest.raises(MovedError) as info:
            await fut
        assert (info.value.slot, info.value.owner, info.value.addr) == (7, "b2", "h:2")

    run(main())


def test_a_newer_epoch_calls_back_once_per_new_value() -> None:
    async def main() -> None:
        seen: list[int] = []
        conn, t = make(on_epoch=lambda c, e: seen.append(e))
        futs = [conn.request("PING", {}) for _ in range(3)]
        await asyncio.sleep(0)
        for (rid, _, _), epoch in zip(t.sent_frames(), [4, 4, 5], strict=True):
            conn.data_received(encode_frame([rid, "ok", None, epoch]))
        await asyncio.gather(*futs)
        assert seen == [4, 5]
        assert conn.max_epoch == 5

    run(main())


def test_a_request_times_out_and_a_late_reply_is_dropped() -> None:
    async def main() -> None:
        conn, t = make()
        fut = conn.request("PULL", {}, timeout=0.01)
        with pytest.raises(TimeoutError):
            await fut
        rid = t.sent_frames()[0][0]
        conn.data_received(encode_frame([rid, "ok", [], 0]))  # no error, ignored
        assert conn.in_flight == 0

    run(main())


def test_connection_lost_fails_pending_and_later_requests() -> None:
    async def main() -> None:
        conn, _ = make()
        fut = conn.request("PING", {})
        conn.connection_lost(None)
        with pytest.raises(ConnectionClosedError):
            await fut
        assert conn.closed
        with pytest.raises(ConnectionClosedError):
            await conn.request("PING", {})

    run(main())


def test_an_oversized_reply_aborts_the_connection() -> None:
    async def main() -> None:
        conn, t = make(max_frame=16)
        fut = conn.request("PING", {})
        conn.data_received((1000).to_bytes(4, "big") + b"x")
        with pytest.raises(TooLargeError):
            await fut
        assert t.closed

    run(main())


def test_an_undecodable_reply_aborts_the_connection() -> None:
    async def main() -> None:
        conn, t = make()
        fut = conn.request("PING", {})
        conn.data_received((1).to_bytes(4, "big") + b"\xc1")  # 0xc1 is never valid msgpack
        with pytest.raises(Exception):  # noqa: B017
            await fut
        assert t.closed

    run(main())


def test_request_frames_are_msgpack_with_bin_payloads() -> None:
    async def main() -> None:
        conn, t = make()
        conn.request("ADD", {"queue": "q", "jobs": [["id", "n", msgpack.packb({"a": 1}), None]]})
        await asyncio.sleep(0)
        frame = t.sent_frames()[0]
        assert frame[1] == "ADD"
        assert msgpack.unpackb(frame[2]["jobs"][0][2]) == {"a": 1}

    run(main())
