"""A minimal blocking wire client for tests that need exact frames."""

from __future__ import annotations

import socket
import struct
from collections import deque
from typing import Any

import msgpack

from shardq.codec import FrameDecoder, encode_frame

# Every RawConn a test opened; tests/conftest.py closes what is left after each
# test, so a test that drops one never leaks an unclosed socket into the next.
OPEN: list[RawConn] = []


class RawConn:
    def __init__(self, addr: str, hello: bool = True, timeout: float = 10.0) -> None:
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        OPEN.append(self)
        self.dec = FrameDecoder(64 * 1024 * 1024)
        self.rid = 0
        self.pending: dict[int, Any] = {}
        self.inbox: deque[Any] = deque()
        if hello:
            assert self.call("HELLO", {"version": 1})[1] == "ok"

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_frame(self) -> Any:
        while not self.inbox:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.inbox.extend(self.dec.feed(data))
        return self.inbox.popleft()

    def call(self, op: str, args: Any) -> list[Any]:
        self.rid += 1
        rid = self.rid
        self.sock.sendall(encode_frame([rid, op, args]))
        while rid not in self.pending:
            f = self.recv_frame()
            self.pending[f[0]] = f
        return self.pending.pop(rid)  # type: ignore[no-any-return]

    def ok(self, op: str, args: Any) -> Any:
        reply = self.call(op, args)
        assert reply[1] == "ok", reply
        return reply[2]

    def close(self) -> None:
        self.sock.close()


def add_args(queue: str, *ids: str, opts: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"queue": queue, "jobs": [[i, "job", msgpack.packb({"i": i}), opts] for i in ids]}


def length_prefix(n: int) -> bytes:
    return struct.pack(">I", n)
