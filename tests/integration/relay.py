"""A TCP relay for network-failure tests (asyncpg's fault-injecting proxy).

It forwards each accepted connection to `target`. `blackhole()` makes every
connection open at that moment stop forwarding in both directions while its
sockets stay open: what a load balancer or NAT that dropped its mapping
does. Connections accepted later forward normally.
"""

from __future__ import annotations

import asyncio
import contextlib


class Relay:
    def __init__(self) -> None:
        self.target = ""
        self.accepted = 0
        self.upstream_closed = 0  # relayed connections the target side closed
        self._server: asyncio.Server | None = None
        self._links: list[_Link] = []
        self.port = 0

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def blackhole(self) -> int:
        """Stop forwarding on every open connection; returns how many."""
        live = [link for link in self._links if not link.done]
        for link in live:
            link.blackholed = True
        return len(live)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        host, _, port = self.target.rpartition(":")
        try:
            up_r, up_w = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return
        link = _Link()
        link.writers = [writer, up_w]
        self._links.append(link)
        await asyncio.gather(self._pump(reader, up_w, link, False),
                             self._pump(up_r, writer, link, True))
        link.done = True

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, link: _Link,
                    from_upstream: bool) -> None:
        try:
            while True:
                data = await r.read(65536)
                if not data:
                    if from_upstream:
                        self.upstream_closed += 1
                    break
                if not link.blackholed:
                    w.write(data)
                    await w.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # A black-holed link stays open towards the other side: the peer
            # must find out by itself that nothing comes through any more.
            if not link.blackholed:
                w.close()

    async def aclose(self) -> None:
        for link in self._links:
            for w in link.writers:
                w.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)


class _Link:
    __slots__ = ("blackholed", "done", "writers")

    def __init__(self) -> None:
        self.blackholed = False
        self.done = False
        self.writers: list[asyncio.StreamWriter] = []


def listening_ports(pid: int) -> list[int]:
    """TCP ports process `pid` listens on (from /proc), for a broker started
    with `--advertise` pointing at a relay: its READY line names the relay."""
    import os

    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    ports.append(int(cols[1].rsplit(":", 1)[1], 16))
    return ports
