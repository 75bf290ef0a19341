"""TCP front end: one asyncio.Protocol per connection, and `serve(config)`.

A connection decodes frames with the sans-IO codec, runs each request
through `broker.ops.OPS` (handler and durability per op) and writes replies. Bad input answers an
error on that connection only; nothing a client sends can stop the broker
(docs/design.md §9.7).
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shardq import protocol as p
from shardq.broker import replies
from shardq.broker.engine import Broker, BrokerConfig
from shardq.broker.ops import OPS, PARKED
from shardq.broker.replies import Durability
from shardq.codec import FrameDecoder, is_bad_frame
from shardq.errors import AuthError, BadRequestError, BusyError, ServerError, TooLargeError
from shardq.netopts import tune_socket
from shardq.tls import COORDINATOR_CN, peer_common_name

if TYPE_CHECKING:
    from shardq.broker.membership import MembershipAgent

log = logging.getLogger("shardq.broker.server")


# Until HELLO succeeds a connection may send only small frames, and only a
# few refused ones: an unauthenticated peer cannot make the broker buffer a
# 16 MiB frame or queue unbounded error replies (docs/design.md §4).
PREAUTH_MAX_FRAME = 4096
PREAUTH_MAX_REFUSALS = 16
# Refused while the disk is full: the ops that add data. Acks, fails and the
# rest of the writes are applied and answered once a commit succeeds again.
GROWTH_OPS = frozenset({p.ADD, p.FLOW_ADD_CHILDREN, p.FLOW_ADD_PARENT, p.SCHED_UPSERT, p.LOG,
                        p.DLQ_RETRY, p.IMPORT_CHUNKS, p.IMPORT_OPS, p.HANDOFF_PREPARE,
                        p.HANDOFF_COPY})
# A connection over --max-connections gets this long to send its first frame,
# which is answered BUSY (so the client backs off rather than seeing a reset).
REJECT_LINGER_S = 1.0


@dataclass(frozen=True, slots=True)
class ListenerOptions:
    """How the listener secures connections (README "Security and limits")."""

    ssl: ssl.SSLContext | None = None  # TLS on the listener (--ssl-cert/--ssl-key)
    # --ssl-client-ca: a control connection must present a client certificate
    # signed by it, and only the coordinator's (CN shardq-coordinator) may
    # send COORDINATOR_OPS.
    control_needs_cert: bool = False
    # --coordinator-token: only a HELLO with it may send COORDINATOR_OPS.
    coordinator_token: str | None = None

    @property
    def tells_coordinator(self) -> bool:
        """Whether the coordinator can be told from the other control peers."""
        return self.control_needs_cert or self.coordinator_token is not None


class BrokerConnection(asyncio.Protocol):
    def __init__(self, broker: Broker, server: BrokerServer) -> None:
        self.broker = broker
        self.server = server
        self.decoder = FrameDecoder(min(PREAUTH_MAX_FRAME, broker.config.max_frame))
        self.transport: asyncio.Transport | None = None
        cfg = broker.config
        self.authed = cfg.token is None
        # May send CONTROL_OPS: the control token's HELLO, or a broker with
        # no tokens at all (open, for development).
        self.control = cfg.token is None and cfg.control_token is None
        # May also send COORDINATOR_OPS (term and ownership changes).
        self.coordinator = self.control and not server.listener.tells_coordinator
        self.peer_cn: str | None = None  # a verified client certificate's CN
        # HELLO succeeded (or, with no token, a first request was served):
        # from then on the full frame limit applies and no deadline runs.
        self.greeted = False
        self.refusals = 0
        self.rejected = False  # over --max-connections: answer BUSY, then close
        self.peer = "?"
        self.opened_at = self.last_rx = time.monotonic()

    # asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = str(transport.get_extra_info("peername"))
        tune_socket(transport.get_extra_info("socket"))
        if self.server.listener.control_needs_cert:
            self.peer_cn = peer_common_name(transport.get_extra_info("peercert"))
            self._grant_open_roles()
        if len(self.server.connections) >= self.broker.config.max_connections:
            self.rejected = True
            asyncio.get_running_loop().call_later(REJECT_LINGER_S, self._refuse_busy, 0)
            return
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.broker.drop_sink(self)

    def pause_writing(self) -> None:
        # The peer does not read its replies: stop reading its requests, so
        # neither the write buffer nor the decoder grows without bound.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def write_buffer_size(self) -> int:
        """Bytes queued for the peer (event pushes check it: a slow subscriber)."""
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close_with(self, code: str, message: str) -> None:
        """Tell the peer why (an unsolicited reply, req_id 0), then close."""
        self.write(replies.error_frame(0, code, message, self.broker.epoch))
        if self.transport is not None:
            self.transport.close()

    def _refuse_busy(self, req_id: int) -> None:
        if self.is_closing():
            return
        limit = self.broker.config.max_connections
        busy = BusyError(f"broker {self.broker.config.broker_id} has its limit of {limit} "
                         "connections open", 1000)
        self.write(replies.error_of(req_id, busy, self.broker.epoch))
        assert self.transport is not None
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        if self.greeted:
            self._run(self._feed(data))
            return
        # Before HELLO: one frame at a time, so the frame that authenticates
        # raises the limit before the next frame is even delimited.
        frames = self._feed(data, 1)
        while frames and not self.greeted:
            if self.rejected:
                self._refuse_busy(_req_id_of(frames[0]))
                return
            self._run(frames)
            if self.is_closing():
                return
            if self.greeted:
                break  # the rest is delimited under the full frame limit, below
            if self.refusals >= PREAUTH_MAX_REFUSALS:
                self.close_with(AuthError.code, "too many requests before a successful HELLO")
                return
            frames = self._feed(b"", 1)
        if self.greeted:
            self.decoder.max_frame = self.broker.config.max_frame
            self._run(self._feed(b""))

    def _feed(self, data: bytes, limit: int = 0) -> list[Any]:
        try:
            return self.decoder.feed(data, limit)
        except TooLargeError as exc:
            # The stream cannot be resynchronised after a bad length prefix.
            if not self.greeted:
                exc = TooLargeError(f"{exc} (before HELLO frames are limited to "
                                    f"{self.decoder.max_frame} bytes)")
            self.close_with(exc.code, str(exc))
            return []

    def _run(self, frames: list[Any]) -> None:
        if not frames:
            return
        immediate: list[bytes] = []
        deferred: list[bytes] = []
        for frame in frames:
            self._handle(frame, immediate, deferred)
        if immediate:
            self.write(b"".join(immediate))
        if deferred:
            self.broker.commits.defer_reply(self, b"".join(deferred))

    # requests ---------------------------------------------------------
    def _handle(self, frame: Any, immediate: list[bytes], deferred: list[bytes]) -> None:
        b = self.broker
        req_id = 0
        try:
            if is_bad_frame(frame):
                raise BadRequestError(f"undecodable frame: {frame.reason}")
            if not isinstance(frame, list) or len(frame) != 3:
                raise BadRequestError("request must be [req_id, op, args]")
            req_id, op, args = frame
            if not isinstance(req_id, int) or isinstance(req_id, bool):
                req_id = 0
                raise BadRequestError("req_id must be an integer")
            if op == p.HELLO:
                immediate.append(self._reply(req_id, p.OK, self._hello(args)))
                self.greeted = True
                return
            if not self.authed:
                self.refusals += 1
                raise AuthError("authenticate with HELLO {token} first")
            self.greeted = True
            spec = OPS.get(op) if isinstance(op, str) else None
            if spec is None:
                raise BadRequestError(f"unknown op {op!r}")
            if b.refusing_adds and op in GROWTH_OPS:
                raise BusyError(f"broker {b.config.broker_id} cannot write: its disk is full "
                                "(adds resume by themselves when space returns)", 1000)
            if op in p.CONTROL_OPS:
                self._check_control(op)
            body = spec.handler(b, args, self, req_id)
            if body is PARKED:
                return
            self._route(self._reply(req_id, p.OK, body), spec.durability, immediate, deferred)
        except ServerError as exc:
            immediate.append(self._reply(req_id, exc.code, exc.to_body()))
        except Exception as exc:  # a bug must cost one request, not the broker
            log.exception("op failed")
            immediate.append(self._reply(req_id, BadRequestError.code, f"internal error: {exc!r}"))

    def _check_control(self, op: str) -> None:
        """A control op needs the control role; a term or ownership op the
        coordinator's (README "Security and limits")."""
        if not self.control:
            raise AuthError(f"{op} needs a control connection (HELLO with the control "
                            "token); a client token cannot send it")
        if op in p.COORDINATOR_OPS and not self.coordinator:
            raise AuthError(f"{op} is the coordinator's: this control connection is not "
                            "the coordinator's (its token or certificate); nothing changed")

    def _route(self, out: bytes, durability: Durability, immediate: list[bytes],
               deferred: list[bytes]) -> None:
        """Where a reply goes by its op's durability (broker/replies.py)."""
        if durability is Durability.DURABLE:
            deferred.append(out)  # to the commit log, with the batch's other replies
            return
        immediate.append(out)
        if durability is Durability.LAZY:
            self.broker.commits.flush_soon()  # committed soon; nobody waits for it

    def _reply(self, req_id: int, status: str, body: Any) -> bytes:
        return replies.error_frame(req_id, status, body, self.broker.epoch)

    def _hello(self, args: Any) -> dict[str, Any]:
        if not isinstance(args, dict):
            raise BadRequestError("HELLO args must be a map")
        if args.get("version") != p.PROTOCOL_VERSION:
            raise BadRequestError(f"unsupported protocol version {args.get('version')!r}; "
                                  f"this broker speaks {p.PROTOCOL_VERSION}")
        self._authenticate(args.get("token"))
        cfg = self.broker.config
        return {"broker_id": cfg.broker_id, "epoch": self.broker.epoch,
                "version": p.PROTOCOL_VERSION, "max_frame": cfg.max_frame,
                "max_job_data": cfg.max_job_data,
                "role": "coordinator" if self.coordinator and self.server.listener
                .tells_coordinator else "control" if self.control else "client"}

    def _authenticate(self, got: Any) -> None:
        """Set the connection's role from HELLO's token (README "Security")."""
        cfg = self.broker.config
        lo = self.server.listener
        if lo.coordinator_token is not None and _same(got, lo.coordinator_token):
            self.authed = self.control = self.coordinator = True
        elif cfg.control_token is not None and _same(got, cfg.control_token):
            self.authed = self.control = True
            self.coordinator = not lo.tells_coordinator
        elif cfg.token is not None and not _same(got, cfg.token):
            self.authed = self.control = self.coordinator = False
            self.refusals += 1
            raise AuthError("wrong or missing token")
        else:
            self.authed = True
            # Without a control token the client token keeps both roles.
            self.control = cfg.control_token is None
            self.coordinator = self.control and not lo.tells_coordinator
        if lo.control_needs_cert:
            # Refuse the HELLO only when it claimed control with a token; a
            # client token (or none, when open) just gets the client role.
            claimed = self.coordinator or (cfg.control_token is not None and self.control)
            self._check_control_cert(control_token=claimed)

    def _check_control_cert(self, *, control_token: bool) -> None:
        """With --ssl-client-ca, control needs a verified client certificate
        and the coordinator's role its CN (README "Security and limits")."""
        if self.peer_cn is None:
            self.control = self.coordinator = False
            if control_token:
                self.authed = False
                self.refusals += 1
                raise AuthError("a control connection needs a client certificate signed by "
                                "the broker's --ssl-client-ca")
            return
        if self.server.listener.coordinator_token is None:  # else the token decides
            self.coordinator = self.control and self.peer_cn == COORDINATOR_CN

    def _grant_open_roles(self) -> None:
        """Before HELLO, with no tokens (open): the certificate decides."""
        if self.control:
            self.coordinator = True
            self._check_control_cert(control_token=False)


def _same(got: Any, want: str) -> bool:
    return isinstance(got, str) and hmac.compare_digest(got.encode(), want.encode())


def _req_id_of(frame: Any) -> int:
    if isinstance(frame, list) and frame and isinstance(frame[0], int) \
            and not isinstance(frame[0], bool):
        return frame[0]
    return 0


class BrokerServer:
    """Owns the listening socket, the connections and the broker's tasks."""

    def __init__(self, broker: Broker, listener: ListenerOptions | None = None) -> None:
        self.broker = broker
        self.listener = listener or ListenerOptions()
        self.connections: set[BrokerConnection] = set()
        self.server: asyncio.Server | None = None
        self.port = 0
        self._sweep: asyncio.TimerHandle | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.broker.start(loop)
        self.server = await loop.create_server(
            lambda: BrokerConnection(self.broker, self), host, port,
            reuse_address=True, backlog=2048, ssl=self.listener.ssl,
            ssl_handshake_timeout=self.broker.config.handshake_timeout_s
            if self.listener.ssl is not None else None)
        self.port = self.server.sockets[0].getsockname()[1]
        self._schedule_sweep()

    def _sweep_every(self) -> float:
        cfg = self.broker.config
        return min(max(min(cfg.handshake_timeout_s, cfg.idle_timeout_s) / 4, 0.05), 1.0)

    def _schedule_sweep(self) -> None:
        self._sweep = asyncio.get_running_loop().call_later(self._sweep_every(), self.sweep)

    def sweep(self) -> None:
        """Close connections past the handshake deadline or the idle limit.

        One pass over the connections a few times a second, instead of a
        timer per connection re-armed at every read. A silent client's active
        jobs stay locked until their locks expire, as for any lost worker.
        """
        cfg = self.broker.config
        now = time.monotonic()
        for c in list(self.connections):
            if not c.greeted and now - c.opened_at >= cfg.handshake_timeout_s:
                c.close_with(AuthError.code if not c.authed else BadRequestError.code,
                             f"no HELLO within {cfg.handshake_timeout_s:g} s")
                self.connections.discard(c)
            elif now - c.last_rx >= cfg.idle_timeout_s:
                c.close_with(BadRequestError.code, f"idle for {cfg.idle_timeout_s:g} s; closing")
                self.connections.discard(c)
        self._schedule_sweep()

    async def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        if self.server is not None:
            self.server.close()
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.close()
        await self.broker.commits.flush_all(checkpoint=True)


async def serve(config: BrokerConfig, host: str, port: int, metrics_port: int | None = None,
                ready: bool = True, clock: Callable[[], int] | None = None,
                listener: ListenerOptions | None = None) -> None:
    """Run a broker until SIGTERM/SIGINT; prints `READY host:port` once bound."""
    broker = Broker(config, clock=clock)
    broker.recover()
    _tune_gc()
    server = BrokerServer(broker, listener)
    await server.start(host, port)
    watchdog_ms = int(os.environ.get("SHARDQ_WATCHDOG_MS") or 0)
    if watchdog_ms > 0:
        from shardq.broker import watchdog

        watchdog.start(asyncio.get_running_loop(), watchdog_ms)
    adv_host = host if host not in ("0.0.0.0", "", "::") else "127.0.0.1"
    addr = config.advertise or f"{adv_host}:{server.port}"
    broker.config = _with_advertise(config, addr)
    agent = _membership_agent(broker, config, addr)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics_task, bound = None, 0
    if metrics_port is not None:
        from shardq.broker.metrics import start_metrics_server

        metrics_task, bound = start_metrics_server(broker, host, metrics_port)
        log.info("metrics on http://%s:%d/metrics", host, bound)
    if ready:
        sys.stdout.write(f"READY {addr}\n")
        if metrics_task is not None:  # after READY, the first line (docs/design.md §8)
            sys.stdout.write(f"METRICS {adv_host}:{bound}\n")
        sys.stdout.flush()
    log.info("broker %s listening on %s (%s)", config.broker_id, addr,
             "durable" if config.durable else "fast")
    if config.token is not None and config.control_token is None:
        log.warning("no --control-token: the client token may also send handoff and term "
                    "ops; give the coordinator and brokers a separate control token")
    async with asyncio.TaskGroup() as tg:
        tg.create_task(_housekeeping(broker, stop))
        agent_task = tg.create_task(agent.run()) if agent else None
        flows_task = tg.create_task(broker.flows.run())
        await stop.wait()
        if agent is not None and _should_drain(broker):
            stop.clear()  # a second SIGTERM stops waiting for the drain
            await _drain_self(broker, stop)
            stop.set()  # and ends the housekeeping task
        if agent_task is not None:
            agent_task.cancel()
        flows_task.cancel()
    if metrics_task is not None:
        metrics_task.cancel()
    await server.close()
    broker.close()


def _tune_gc() -> None:
    """Millions of long-lived job objects make every full GC pass walk them all;
    they form no cycles, so freeze what recovery built and collect the old
    generation rarely. Young passes stay small: (50k, 50) let a gen-1 pass
    walk 2.5M objects (a 0.5 s stall in a burst of adds); (10k, 10) keeps
    every pass under ~11 ms for the same total time (measured while
    allocating 1M jobs)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 1000)


def _membership_agent(broker: Broker, config: BrokerConfig, addr: str) -> MembershipAgent | None:
    """The agent that registers and heartbeats with the coordinator; without a
    coordinator the broker owns every slot on its own (standalone)."""
    if not config.coordinator:
        broker.bootstrap_standalone()
        return None
    from shardq.broker.membership import MembershipAgent

    return MembershipAgent(broker_id=config.broker_id, advertise=addr, weight=config.weight,
                           coordinator_url=config.coordinator, token=config.link_token,
                           get_stats=broker.stats, on_topology=broker.apply_topology,
                           on_leases=broker.apply_leases, storage=broker.storage_id,
                           zone=config.zone)


def _with_advertise(config: BrokerConfig, addr: str) -> BrokerConfig:
    from dataclasses import replace

    return replace(config, advertise=addr)


DRAIN_TIMEOUT_S = 600.0


def _should_drain(broker: Broker) -> bool:
    """SIGTERM drains first only when asked to (--drain-on-term) or when the
    coordinator is scaling this broker in; a plain restart moves nothing."""
    me = broker.topology.brokers.get(broker.config.broker_id)
    state = str(me.state) if me is not None else ""
    return broker.config.drain_on_term or state in ("leaving", "draining")


async def _drain_self(broker: Broker, stop: asyncio.Event) -> None:
    """Ask the coordinator to move every slot away, and wait until none is
    left (bounded; a second SIGTERM stops waiting)."""
    import httpx

    from shardq import coordinator_http

    cfg = broker.config
    if cfg.coordinator is None:
        return  # nothing to ask: only a broker with a coordinator drains
    log.warning("draining %s before exit", cfg.broker_id)
    try:
        async with coordinator_http.async_client(cfg.coordinator, cfg.link_token,
                                                 timeout_s=10) as http:
            r = await http.post(f"/brokers/{cfg.broker_id}/drain", json={})
            if r.status_code >= 400:
                log.error("coordinator refused to drain %s: %s", cfg.broker_id, r.text)
                return
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            while any(broker.owned) and not stop.is_set():
                try:
                    async with asyncio.timeout(0.2):
                        await stop.wait()
                except TimeoutError:
                    pass
    except (httpx.HTTPError, TimeoutError) as exc:
        log.error("drain of %s did not finish: %r; exiting with slots kept", cfg.broker_id, exc)


async def _housekeeping(broker: Broker, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            async with asyncio.timeout(1.0):
                await stop.wait()
        except TimeoutError:
            broker.housekeeping()
