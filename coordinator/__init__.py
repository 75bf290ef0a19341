"""shardq.coordinator: membership, topology and stats for a shardq cluster (DESIGN §6).

One small process with an HTTP API and its own SQLite file. It is not on
the data path: brokers and clients keep working on their last topology
while it is down.

    state.py        the SQLite store (term, brokers, topology per epoch, barred ids)
    membership.py   the decisions: register, heartbeat, dead, bootstrap, forget
    app.py          starlette routes over Membership, bearer-token check
    server.py       data-dir lock, socket bind, uvicorn, READY line
    api_client.py   a small sync HTTP client for the CLI (status, topology, forget)
    supervisor.py   `shardq cluster up`: the coordinator and brokers as child processes
"""

from .app import create_app
from .errors import BadRequest, Conflict, CoordinatorError, Forbidden, NotFound, Unauthorized
from .membership import Membership
from .server import CoordinatorConfig, serve, serve_async
from .state import BrokerRecord, Snapshot, Store

__all__ = [
    "BadRequest",
    "BrokerRecord",
    "Conflict",
    "CoordinatorConfig",
    "CoordinatorError",
    "Forbidden",
    "Membership",
    "NotFound",
    "Snapshot",
    "Store",
    "Unauthorized",
    "create_app",
    "serve",
    "serve_async",
]
