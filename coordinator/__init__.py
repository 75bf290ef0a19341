"""shardq.coordinator: membership, topology and stats for a shardq cluster (docs/design.md §6).

One small process with an HTTP API and its own SQLite file. It is not on
the data path: brokers and clients keep working on their last topology
while it is down.

    state.py        the SQLite store (term, brokers, topology per epoch, barred ids)
    membership.py   the decisions: register, heartbeat, dead, bootstrap, forget
    app.py          starlette routes over Membership, bearer-token check
    stats.py        the brokers' heartbeat stats aggregated: rates, owner dedupe, GET /stats
    metrics.py      that view as Prometheus text, GET /metrics
    server.py       data-dir lock, socket bind, uvicorn, READY line
    moves.py        the move executor: one handoff through its phases, commit point, abort
    rebalance.py    plans and runs moves (K at a time, throttle, progress, cancel), drain
    links.py        cached wire connections to brokers for the handoff ops
    api_client.py   a small sync HTTP client for the CLI (status, topology, forget, drain...)
    supervisor.py   `shardq cluster up`: the coordinator and brokers as child processes,
                    with a loopback control port for `shardq scale out|in`
"""

from .app import create_app
from .errors import BadRequest, Conflict, CoordinatorError, Forbidden, NotFound, Unauthorized
from .links import BrokerGone, BrokerLinks
from .membership import Membership
from .moves import MoveExecutor, MovePolicy, SendOp
from .rebalance import Rebalancer
from .server import CoordinatorConfig, serve, serve_async
from .state import BrokerRecord, MoveRecord, MoveState, Snapshot, Store
from .stats import BrokerView, ClusterView, QueueView, StatsBook

__all__ = [
    "BadRequest",
    "BrokerGone",
    "BrokerLinks",
    "BrokerRecord",
    "BrokerView",
    "ClusterView",
    "Conflict",
    "CoordinatorConfig",
    "CoordinatorError",
    "Forbidden",
    "Membership",
    "MoveExecutor",
    "MovePolicy",
    "MoveRecord",
    "MoveState",
    "NotFound",
    "QueueView",
    "Rebalancer",
    "SendOp",
    "Snapshot",
    "StatsBook",
    "Store",
    "Unauthorized",
    "create_app",
    "serve",
    "serve_async",
]
