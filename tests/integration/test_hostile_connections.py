"""Hostile and dead connections against a real broker (docs/design.md §4).

Raw sockets that never send HELLO, unfinished oversized frames before HELLO,
a full connection limit, idle connections, and a relay that black-holes an
established link. Each test also checks that the well-behaved client's
answered writes are all there.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from pathlib import Path

import msgpack

import shardq
from shardq.codec import FrameDecoder, encode_frame
from tests.aio import run, running, until
from tests.integration.rawwire import RawConn, add_args
from tests.integration.relay import Relay, listening_ports

TOKEN = "s3cret"


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _raw(addr: str) -> socket.socket:
    host, port = addr.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _frames_until_eof(sock: socket.socket, timeout: float = 10.0) -> list[object]:
    """Every frame the broker sends before it closes the socket."""
    sock.settimeout(timeout)
    dec = FrameDecoder()
    frames: list[object] = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        frames.extend(dec.feed(data))
    return frames


def test_silent_sockets_are_closed_at_the_handshake_deadline(start_broker) -> None:  # type: ignore[no-untyped-def]
    b = start_broker("b1", "--token", TOKEN, "--max-connections", "20",
                     "--handshake-timeout", "1")
    silent = [_raw(b.addr) for _ in range(20)]
    # The limit is full: one more connection is answered BUSY with a reason
    # (its HELLO's req_id), not reset.
    extra = _raw(b.addr)
    extra.sendall(encode_frame([7, "HELLO", {"version": 1, "token": TOKEN}]))
    reply = _frames_until_eof(extra)
    extra.close()
    assert len(reply) == 1 and reply[0][0] == 7 and reply[0][1] == "BUSY"  # type: ignore[index]
    assert "connections" in reply[0][2]["message"]  # type: ignore[index]
    # Each silent socket is told why and closed once its deadline passed...
    started = time.monotonic()
    for s in silent:
        frames = _frames_until_eof(s)
        assert frames and "no HELLO within 1 s" in str(frames[0])
        s.close()
    assert time.monotonic() - started < 5
    # ... which frees the slots for real clients.

    async def main() -> None:
        async with await shardq.connect(b.addr, TOKEN) as client:
            q = client.queue("q")
            await q.add("a", {"x": 1}, job_id="j1")
            assert (await q.counts())["waiting"] == 1

    run(main())


def test_a_full_connection_limit_is_a_busy_error_the_client_waits_out(start_broker) -> None:  # type: ignore[no-untyped-def]
    b = start_broker("b1", "--max-connections", "3", "--handshake-timeout", "1.5")
    silent = [_raw(b.addr) for _ in range(3)]

    async def main() -> None:
        # The client is BUSY-refused until the silent sockets' deadline, and
        # backs off and retries within its budget instead of failing.
        t0 = time.monotonic()
        async with await shardq.connect(b.addr) as client:
            await client.queue("q").add("a", {"x": 1}, job_id="j1")
        assert time.monotonic() - t0 >= 1.0

    try:
        run(main())
    finally:
        for s in silent:
            s.close()


def test_unfinished_huge_frames_before_hello_are_refused_and_memory_stays_bounded(
        start_broker) -> None:  # type: ignore[no-untyped-def]
    b = start_broker("b1", "--token", TOKEN)
    good = RawConn(b.addr, hello=False)
    good.ok("HELLO", {"version": 1, "token": TOKEN})
    good.ok("ADD", add_args("q", *[f"a{i}" for i in range(100)]))
    before = _rss_kb(b.pid)
    chunk = b"\0" * (1024 * 1024)
    socks = []
    for _ in range(60):
        s = _raw(b.addr)
        try:
            s.sendall(struct.pack(">I", 15 * 1024 * 1024) + chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed before we finished sending
        socks.append(s)
    for s in socks:
        frames = _frames_until_eof(s)
        assert frames and frames[0][1] == "TOO_LARGE", frames  # type: ignore[index]
        assert "before HELLO" in frames[0][2]  # type: ignore[index]
        s.close()
    # A frame under the pre-auth limit but never finished is buffered, at
    # most a few KB, until the handshake deadline.
    assert _rss_kb(b.pid) - before < 30_000
    assert good.ok("COUNTS", {"queue": "q"})["waiting"] == 100
    # After HELLO the full frame limit applies (a 1 MiB bulk add).
    data = msgpack.packb(b"x" * 1000)
    big = {"queue": "q", "jobs": [[f"big{i}", "n", data, None] for i in range(1000)]}
    assert len(good.ok("ADD", big)) == 1000


def test_too_many_refused_requests_before_hello_close_the_connection(start_broker) -> None:  # type: ignore[no-untyped-def]
    b = start_broker("b1", "--token", TOKEN)
    s = _raw(b.addr)
    s.sendall(b"".join(encode_frame([i, "PING", {}]) for i in range(1, 1000)))
    frames = _frames_until_eof(s)
    s.close()
    assert 10 <= len(frames) <= 20  # replies stop at the refusal limit, then EOF
    assert all(f[1] == "AUTH" for f in frames)  # type: ignore[index]


def test_an_idle_connection_is_closed_and_a_pinging_client_stays(start_broker) -> None:  # type: ignore[no-untyped-def]
    b = start_broker("b1", "--idle-timeout", "1")
    raw = RawConn(b.addr)
    raw.ok("PING", {})
    t0 = time.monotonic()
    frames = _frames_until_eof(raw.sock)
    assert "idle" in str(frames) and 0.9 <= time.monotonic() - t0 < 5

    async def main() -> None:
        async with await shardq.connect(b.addr, ping_interval=0.2) as client:
            q = client.queue("q")
            await q.add("a", {}, job_id="j1")
            conns = client._cluster.open_channels()
            await asyncio.sleep(2.5)  # the absence of a close is what is tested
            assert client._cluster.open_channels() == conns and not conns[0].closed
            await q.add("a", {}, job_id="j2")
            assert (await q.counts())["waiting"] == 2

    run(main())


def test_a_blackholed_link_is_found_dead_by_ping_and_redialed(start_broker) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        relay = await Relay().start()
        # Clients reach the broker only through the relay: it advertises it.
        b = start_broker("b1", "--advertise", relay.addr, "--idle-timeout", "2")
        (port,) = listening_ports(b.pid)
        relay.target = f"127.0.0.1:{port}"
        try:
            async with await shardq.connect(relay.addr, ping_interval=0.3, ping_timeout=0.5,
                                            request_timeout=30) as client:
                q = client.queue("bh")
                done: set[str] = set()

                async def handle(job: shardq.Job) -> None:
                    done.add(job.id)

                worker = client.worker("bh", handle, concurrency=4, wait_ms=1000, lock_ms=2000)
                async with running(worker):
                    for i in range(5):
                        await q.add("n", {}, job_id=f"before{i}")
                    await until(lambda: len(done) == 5, "jobs before the black hole")
                    accepted = relay.accepted
                    assert relay.blackhole() >= 2  # the shared link and the worker's lane
                    t0 = time.monotonic()
                    # These adds start on the dead link: a missed pong closes it
                    # and they are resent on a new one.
                    for i in range(5):
                        await q.add("n", {}, job_id=f"after{i}")
                    assert time.monotonic() - t0 < 8
                    assert relay.accepted > accepted
                    await until(lambda: len(done) == 10, "jobs after the black hole",
                                timeout=30)
                    # The broker dropped its half-open sockets (idle limit).
                    await until(lambda: relay.upstream_closed >= 2, "broker closing dead links")
                counts = await q.counts()
                assert counts["completed"] == 10 and counts["waiting"] == 0
        finally:
            await relay.aclose()

    run(main())


def test_a_request_pipelined_behind_hello_in_one_write_is_answered(start_broker) -> None:  # type: ignore[no-untyped-def]
    b = start_broker("b1", "--token", TOKEN)
    s = _raw(b.addr)
    big = {"pad": "x" * 8000}  # over the pre-HELLO frame limit: delimited after HELLO
    s.sendall(encode_frame([1, "HELLO", {"version": 1, "token": TOKEN}])
              + encode_frame([2, "PING", big]) + encode_frame([3, "PING", {}]))
    s.shutdown(socket.SHUT_WR)
    frames = _frames_until_eof(s)
    s.close()
    assert [f[0] for f in frames[:3]] == [1, 2, 3]  # type: ignore[index]
    assert all(f[1] == "ok" for f in frames[:3])  # type: ignore[index]
