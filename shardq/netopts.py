"""Socket options shared by every shardq endpoint (broker, client, links).

TCP keepalive makes the kernel probe a silent peer, so a half-open socket
(the peer's host gone, or a NAT or load balancer that dropped its mapping)
is reported as an error after about KEEPIDLE + KEEPINTVL * KEEPCNT seconds
instead of the ~15 minutes of retransmissions. The application-level ping of
the client (client/connection.py) finds a dead link sooner; keepalive also
covers the peers that do not ping.
"""

from __future__ import annotations

import socket
from typing import Any

KEEPIDLE_S = 30
KEEPINTVL_S = 10
KEEPCNT = 3


def tune_socket(sock: Any) -> None:
    """TCP_NODELAY and keepalive on a connected TCP socket (best effort:
    unix sockets and platforms without the options are left as they are)."""
    if sock is None:
        return
    for level, opt, value in (
        (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), KEEPIDLE_S),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), KEEPINTVL_S),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), KEEPCNT),
    ):
        if opt is None:
            continue
        try:
            sock.setsockopt(level, opt, value)
        except OSError:
            pass
