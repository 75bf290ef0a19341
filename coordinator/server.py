"""Starting the coordinator: lock the data dir, bind, serve, print READY (docs/design.md §8).

The listening socket is bound here and handed to uvicorn, so `--port 0`
reports the port actually bound. `READY host:port` is the first line on
stdout, printed once uvicorn accepts on that socket (trio's
`task_status.started()` discipline): a test that reads it can connect at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import uvicorn
import uvloop

from .app import create_app, default_rebalancer
from .membership import Membership
from .moves import MovePolicy
from .rebalance import Rebalancer
from .replication import ReplicationBook
from .state import Store
from .tenants import TenantBook

log = logging.getLogger("shardq.coordinator")


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    """Everything `shardq coordinator` takes (see its --help)."""

    data_dir: Path
    port: int = 7070
    bind: str = "127.0.0.1"
    advertise: str | None = None
    expect: int = 1
    token: str | None = None
    control_token: str | None = None  # only it may change state; see create_app
    heartbeat_timeout_ms: int = 5000
    rebalance_concurrency: int = 2
    rebalance_throttle_ms: int = 0
    auto_rebalance: bool = True
    handoff_copy_timeout_s: float = 600.0
    handoff_step_timeout_s: float = 10.0
    handoff_retry_budget_s: float = 30.0
    handoff_copy_rate: int = 0
    ui_actions: bool = False
    replicas: int = 0  # docs/design.md §12: 0 or 1
    # Sent to brokers in HELLO instead of the control token: only it may send
    # term and ownership ops (README "Security and limits").
    coordinator_token: str | None = None
    ssl_cert: str | None = None  # HTTPS on the listener (uvicorn's ssl options)
    ssl_key: str | None = None

    @property
    def link_token(self) -> str | None:
        """What the coordinator's broker links send in HELLO."""
        return self.coordinator_token or self.control_token or self.token


def serve(config: CoordinatorConfig) -> None:
    """Run the coordinator until SIGINT/SIGTERM (uvloop, the entry point's loop)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve_async(config))


async def serve_async(config: CoordinatorConfig) -> None:
    """Run the coordinator on the current loop until SIGINT/SIGTERM."""
    with _locked(config.data_dir), _bind(config.bind, config.port) as sock, \
            contextlib.closing(Store.in_dir(config.data_dir)) as store:
        membership = Membership(store, expect=config.expect,
                                heartbeat_timeout_ms=config.heartbeat_timeout_ms)
        interval = max(20, min(1000, config.heartbeat_timeout_ms // 5))
        app = create_app(membership, token=config.token, control_token=config.control_token,
                         check_interval_ms=interval,
                         rebalancer=_rebalancer(membership, config),
                         tenants=TenantBook(store, membership.term),
                         ui_actions=config.ui_actions,
                         replication=ReplicationBook(membership, store, config.replicas),
                         link_token=config.link_token)
        server = _Server(uvicorn.Config(app, log_config=None, access_log=False,
                                        lifespan="on", timeout_graceful_shutdown=5,
                                        ssl_certfile=config.ssl_cert,
                                        ssl_keyfile=config.ssl_key))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.request_exit)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        started = asyncio.create_task(server.started_event.wait())
        await asyncio.wait([serving, started], return_when=asyncio.FIRST_COMPLETED)
        if server.started:
            host, port = sock.getsockname()[:2]
            log.info("coordinator term %d epoch %d listening on %s:%d (advertise %s)",
                     membership.term, membership.epoch, host, port, config.advertise or "-")
            print(f"READY {_shown_host(host)}:{port}", flush=True)
        started.cancel()
        await asyncio.wait([started])
        await serving
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _rebalancer(membership: Membership, config: CoordinatorConfig) -> Rebalancer:
    policy = MovePolicy(step_timeout_s=config.handoff_step_timeout_s,
                        copy_timeout_s=config.handoff_copy_timeout_s,
                        retry_budget_s=config.handoff_retry_budget_s,
                        copy_rate=config.handoff_copy_rate)
    return default_rebalancer(membership, config.link_token, policy=policy,
                              concurrency=config.rebalance_concurrency,
                              throttle_ms=config.rebalance_throttle_ms,
                              auto=config.auto_rebalance)


class _Server(uvicorn.Server):
    """uvicorn.Server that reports startup and leaves signals to us.

    uvicorn's own handlers re-raise the signal after shutdown, which would
    kill the process before the store is closed.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.started_event = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:
            self.started_event.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    def request_exit(self) -> None:
        # A second Ctrl-C stops waiting for open connections.
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket; exits with a one-line reason when the address is taken."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        sys.exit(f"cannot listen on {host}:{port}: {e}")
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
    except OSError as e:
        sock.close()
        sys.exit(f"cannot listen on {host}:{port}: {e}")
    sock.setblocking(False)
    return sock


def _shown_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[IO[str]]:
    """One coordinator per data dir (docs/design.md §6: run as a single instance)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "LOCK", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.exit(f"another coordinator holds {data_dir / 'LOCK'}")
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield f
