"""One pipelined connection to one broker (the client's asyncio adapter).

Layering (docs/design.md §1): `shardq.codec` turns bytes into frames; this module is
the only owner of request ids, reply futures, timeouts and write
backpressure; routing and the Queue/Worker API sit above it and never see
a request id.

It is an `asyncio.Protocol`, not a stream pair: replies are matched to
futures straight from `data_received`, with no reader task. Writes made in
one loop iteration are corked and sent with one `writelines` call, so many
small requests (acks, progress, adds to several queues) cost one syscall.

Every reply carries the broker's topology epoch; the connection remembers
the largest it has seen and calls `on_epoch(conn, epoch)` when a reply
carries a newer one, so the router can refresh its map.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Callable
from typing import Any, cast

from shardq import protocol
from shardq.codec import (
    DEFAULT_MAX_FRAME,
    FrameDecoder,
    bad_frame_error,
    encode_frame,
    is_bad_frame,
)
from shardq.errors import (
    BusyError,
    ConnectionClosedError,
    RequestTimeoutError,
    ShardqError,
    TlsError,
    error_from_wire,
)
from shardq.netopts import tune_socket
from shardq.tls import link_context

log = logging.getLogger("shardq.client")

DEFAULT_REQUEST_TIMEOUT_S = 10.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
# A connection with nothing sent or received for PING_INTERVAL_S sends a
# PING; no pong within PING_TIMEOUT_S means the link is dead (a peer gone
# without a FIN, a NAT that dropped its mapping): the connection is aborted,
# its requests fail as retryable link errors and the owner re-dials.
# Brokers close connections idle past --idle-timeout (default 300 s).
DEFAULT_PING_INTERVAL_S = 5.0
DEFAULT_PING_TIMEOUT_S = 10.0

EpochCallback = Callable[["Connection", int], None]


def split_addr(addr: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:7101`) -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"broker address must be host:port, got {addr!r}")
    return host.strip("[]"), int(port)


class Connection(asyncio.Protocol):
    """A pipelined request/reply channel to one broker.

    Use `open_connection()`; it sends HELLO before anything else. After the
    peer closes or the link breaks, every pending request fails with
    `ConnectionClosedError` and `closed` is true; the owner opens a new one.
    """

    def __init__(self, addr: str, on_epoch: EpochCallback | None = None,
                 max_frame: int = DEFAULT_MAX_FRAME,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
                 ping_interval: float = DEFAULT_PING_INTERVAL_S,
                 ping_timeout: float = DEFAULT_PING_TIMEOUT_S) -> None:
        self.addr = addr
        self.broker_id = ""
        self.max_epoch = 0
        self.request_timeout = request_timeout
        self.frames_sent = 0
        self._on_epoch = on_epoch
        self._loop = asyncio.get_running_loop()
        self._decoder = FrameDecoder(max_frame)
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._next_id = 1
        self._wbuf: list[bytes] = []
        self._write_paused = False
        self._writable: asyncio.Event | None = None
        self._close_reason: BaseException | None = None
        self._lost = self._loop.create_future()
        # Server pushes (SUBSCRIBE): req_id -> handler; None is sent when the
        # link goes, so the subscriber knows to resume elsewhere.
        self._push: dict[int, Callable[[Any], None]] = {}
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._ping_timer: asyncio.TimerHandle | None = None
        self._ping_out = False
        self._last_rx = self._last_tx = self._loop.time()

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports are not asyncio.Transport subclasses; duck-type them.
        self._transport = cast(asyncio.Transport, transport)
        tune_socket(transport.get_extra_info("socket"))

    def data_received(self, data: bytes) -> None:
        self._last_rx = self._loop.time()
        try:
            frames = self._decoder.feed(data)
        except ShardqError as exc:  # oversized frame: the stream cannot resync
            self._abort(exc)
            return
        for frame in frames:
            if is_bad_frame(frame) or not isinstance(frame, list) or len(frame) < 3:
                # A reply we cannot attribute to a request poisons the
                # whole pipeline: fail everything rather than guess.
                reason: ShardqError = (
                    bad_frame_error(frame) if is_bad_frame(frame)
                    else ConnectionClosedError(f"malformed reply from {self.addr}: {frame!r:.200}"))
                self._abort(reason)
                return
            self._on_reply(frame)

    def _on_reply(self, frame: list[Any]) -> None:
        rid = frame[0]
        if rid == 0 and frame[1] != protocol.OK:
            self._abort(_unsolicited_error(self.addr, str(frame[1]), frame[2]))
            return
        if self._push and frame[1] == protocol.PUSH:
            handler = self._push.get(rid)
            if handler is not None:
                handler(frame[2])
            return
        if len(frame) > 3:
            epoch = frame[3]
            if isinstance(epoch, int) and epoch > self.max_epoch:
                self.max_epoch = epoch
                if self._on_epoch is not None:
                    self._on_epoch(self, epoch)
        fut = self._pending.pop(rid, None)
        timer = self._timers.pop(rid, None)
        if timer is not None:
            timer.cancel()
        if fut is None or fut.done():
            return  # timed out or the caller went away
        if frame[1] == protocol.OK:
            fut.set_result(frame[2])
        else:
            if self._push:
                self._push.pop(rid, None)  # a refused SUBSCRIBE pushes nothing
            fut.set_exception(error_from_wire(str(frame[1]), frame[2]))

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._stop_pings()
        if self._close_reason is None:
            self._close_reason = ConnectionClosedError(
                f"connection to {self.addr} lost" + (f": {exc}" if exc else ""))
        self._fail_pending(self._close_reason)
        self._end_pushes()
        if not self._lost.done():
            self._lost.set_result(None)
        if self._writable is not None:
            self._writable.set()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._writable is not None:
            self._writable.set()

    # -- requests ----------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._transport is None or self._close_reason is not None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def subscribe(self, op: str, args: Any, on_push: Callable[[Any], None],
                  timeout: float | None = None) -> asyncio.Future[Any]:
        """`request`, and then call `on_push(body)` for each frame the broker
        pushes under this request's id, and `on_push(None)` once when the
        link goes (see protocol SUBSCRIBE)."""
        if not self.closed:
            self._push[self._next_id] = on_push  # the id `request` takes next
        return self.request(op, args, timeout)

    def _end_pushes(self) -> None:
        handlers, self._push = self._push, {}
        for handler in handlers.values():
            handler(None)

    def request(self, op: str, args: Any, timeout: float | None = None) -> asyncio.Future[Any]:
        """Send one request; the future resolves to the reply body.

        The future fails with the typed `ServerError` for an error status,
        `TimeoutError` after `timeout` seconds (default `request_timeout`;
        `0` means none) and `ConnectionClosedError` if the link goes.
        Cancelling the future forgets the request (a late reply is dropped).
        """
        fut: asyncio.Future[Any] = self._loop.create_future()
        if self.closed:
            fut.set_exception(self._close_reason or ConnectionClosedError(f"{self.addr} closed"))
            return fut
        rid = self._next_id
        self._next_id = rid + 1
        self._pending[rid] = fut
        t = self.request_timeout if timeout is None else timeout
        if t:
            self._timers[rid] = self._loop.call_later(t, self._expire, rid, op)
        self._write(encode_frame([rid, op, args]))
        return fut

    def _expire(self, rid: int, op: str) -> None:
        self._timers.pop(rid, None)
        fut = self._pending.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_exception(RequestTimeoutError(f"{op} to {self.addr} timed out"))
        if op != protocol.PING and self._ping_timer is not None:
            self._send_ping()  # a slow broker or a dead link: find out which now

    # -- liveness --------------------------------------------------------------

    def start_pings(self) -> None:
        """Ping whenever the link is idle (called once HELLO succeeded)."""
        if self._ping_interval > 0 and self._ping_timer is None and not self.closed:
            self._ping_timer = self._loop.call_later(self._ping_interval / 2, self._ping_tick)

    def _stop_pings(self) -> None:
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None

    def _ping_tick(self) -> None:
        if self.closed:
            self._ping_timer = None
            return
        # Idle in either direction: a subscriber that only receives still
        # has to show the broker it is alive.
        if self._loop.time() - min(self._last_rx, self._last_tx) >= self._ping_interval:
            self._send_ping()
        self._ping_timer = self._loop.call_later(self._ping_interval / 2, self._ping_tick)

    def _send_ping(self) -> None:
        if self._ping_out or self.closed:
            return
        self._ping_out = True
        self.request(protocol.PING, {}, timeout=self._ping_timeout).add_done_callback(self._pong)

    def _pong(self, fut: asyncio.Future[Any]) -> None:
        self._ping_out = False
        exc = None if fut.cancelled() else fut.exception()
        if isinstance(exc, TimeoutError) and not self.closed:
            self._abort(ConnectionClosedError(
                f"no pong from {self.addr} within {self._ping_timeout:g} s; link presumed dead"))

    def _write(self, frame: bytes) -> None:
        self.frames_sent += 1
        if not self._wbuf:
            self._loop.call_soon(self._flush)
        self._wbuf.append(frame)

    def _flush(self) -> None:
        buf, self._wbuf = self._wbuf, []
        if self._transport is not None and buf:
            self._last_tx = self._loop.time()
            self._transport.writelines(buf)

    async def wait_writable(self) -> None:
        """Return once the transport's write buffer is below its high mark.

        Senders of large batches await this first, so a slow broker pushes
        back on the producer instead of growing the buffer without bound.
        """
        while self._write_paused and not self.closed:
            if self._writable is None or self._writable.is_set():
                self._writable = asyncio.Event()
            await self._writable.wait()

    # -- closing -------------------------------------------------------------

    def _fail_pending(self, exc: BaseException) -> None:
        if isinstance(exc, ConnectionClosedError) and not exc.maybe_applied:
            # These were sent (or about to be): the broker may have applied them.
            exc = ConnectionClosedError(str(exc), maybe_applied=True)
        pending, self._pending = self._pending, {}
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    def _abort(self, exc: BaseException) -> None:
        log.warning("dropping connection to %s: %s", self.addr, exc)
        self._stop_pings()
        self._close_reason = exc
        self._fail_pending(exc)
        self._end_pushes()
        if self._transport is not None:
            self._transport.abort()

    async def drain_close(self, timeout: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
        """Half-close: no new requests, send EOF, let requests already sent be answered.

        The broker answers what it has (a parked long-poll PULL included,
        if it handed it jobs before it read our EOF) and then closes, so no
        reply can be lost in flight; requests it did not answer fail with
        `ConnectionClosedError`. Aborts after `timeout` seconds.
        """
        if self._transport is None:
            return
        if self._close_reason is None:
            self._close_reason = ConnectionClosedError(f"connection to {self.addr} closed")
        self._flush()
        if not self._transport.can_write_eof():
            await self.aclose()
            return
        self._transport.write_eof()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._lost)
        except TimeoutError:
            self._abort(ConnectionClosedError(f"{self.addr} did not close after EOF"))

    async def aclose(self) -> None:
        """Close the link; pending requests fail with ConnectionClosedError."""
        if self._close_reason is None:
            self._close_reason = ConnectionClosedError(f"connection to {self.addr} closed")
        self._stop_pings()
        self._fail_pending(self._close_reason)
        if self._transport is not None:
            self._flush()
            self._transport.close()
            await asyncio.shield(self._lost)


async def open_connection(addr: str, *, token: str | None = None, client_name: str | None = None,
                          on_epoch: EpochCallback | None = None,
                          connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
                          request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
                          ping_interval: float = DEFAULT_PING_INTERVAL_S,
                          ping_timeout: float = DEFAULT_PING_TIMEOUT_S,
                          ssl_context: ssl.SSLContext | None = None) -> Connection:
    """Connect to `addr` and complete HELLO.

    The connection then pings when idle (`ping_interval`, 0: never) and
    aborts itself when a pong is `ping_timeout` late. With `ssl_context`
    (else the process's link context, shardq/tls.py) the link is TLS and the
    broker's certificate is verified, host name included.

    Raises:
        OSError / TimeoutError: the broker cannot be reached.
        TlsError: the TLS handshake failed (do not retry).
        AuthError: the broker refused the token (do not retry).
        ServerError: any other HELLO refusal.
    """
    loop = asyncio.get_running_loop()
    host, port = split_addr(addr)
    ctx = ssl_context if ssl_context is not None else link_context()
    try:
        async with asyncio.timeout(connect_timeout):
            _, conn = await loop.create_connection(
                lambda: Connection(addr, on_epoch, request_timeout=request_timeout,
                                   ping_interval=ping_interval, ping_timeout=ping_timeout),
                host, port, ssl=ctx, server_hostname=host if ctx is not None else None,
                ssl_handshake_timeout=connect_timeout if ctx is not None else None)
    except ssl.SSLError as exc:
        # Not an OSError to the retry loop: an untrusted certificate, or a
        # cleartext listener's answer to the ClientHello, does not get better.
        raise TlsError(addr, exc.reason or str(exc)) from None
    hello: dict[str, Any] = {"version": protocol.PROTOCOL_VERSION,
                             "client": client_name or f"shardq-py/{os.getpid()}"}
    if token is not None:
        hello["token"] = token
    try:
        reply = await conn.request(protocol.HELLO, hello, timeout=connect_timeout)
    except RequestTimeoutError as exc:
        conn._abort(ConnectionClosedError("HELLO failed"))
        # Only HELLO was sent: no request of the caller's can have been applied.
        raise TimeoutError(str(exc)) from None
    except ConnectionClosedError:
        conn._abort(ConnectionClosedError("HELLO failed"))
        if ctx is None and await _speaks_tls(host, port, connect_timeout):
            # What a TLS listener does with a cleartext HELLO: it drops it,
            # with no alert. A handshake tells that apart from a dying broker.
            raise TlsError(addr, "it speaks TLS and this client connected in cleartext; "
                                 "connect with ssl_ca= (or an https:// coordinator URL)") from None
        raise
    except BaseException:
        conn._abort(ConnectionClosedError("HELLO failed"))
        raise
    _adopt_hello(conn, reply)
    conn.start_pings()
    return conn


def _adopt_hello(conn: Connection, reply: Any) -> None:
    """Keep what the HELLO answer says of the broker: its id and its epoch."""
    if isinstance(reply, dict):
        conn.broker_id = str(reply.get("broker_id", ""))
        epoch = reply.get("epoch")
        if isinstance(epoch, int) and epoch > conn.max_epoch:
            conn.max_epoch = epoch


async def _speaks_tls(host: str, port: int, timeout: float) -> bool:
    """Whether `host:port` completes a TLS handshake (certificate unchecked:
    this only names the cause of a refused cleartext HELLO; nothing is sent)."""
    probe = ssl.create_default_context()
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port, ssl=probe)
    except (OSError, TimeoutError, ssl.SSLError):
        return False
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    return True


def _unsolicited_error(addr: str, code: str, body: Any) -> ShardqError:
    """A broker's error frame with req_id 0 names no request: it says why the
    broker is closing the link (handshake deadline, idle, oversized frame) or
    that it is full (BUSY). All but BUSY are link failures, retried."""
    err = error_from_wire(code, body)
    if isinstance(err, BusyError):
        return err
    return ConnectionClosedError(f"{addr} closed the connection: {code}: {err}")
