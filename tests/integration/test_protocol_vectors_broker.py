"""The golden session of docs/protocol-vectors.json, byte for byte, against a real broker."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

from shardq.codec import FrameDecoder
from tests import protocol_vectors as pv
from tests.conftest import Proc


def check(expect: dict[str, Any], frame: list[Any], what: str) -> None:
    status, body = frame[1], frame[2]
    assert status == expect["status"], (what, frame)
    if "body" in expect:
        assert body == expect["body"], (what, body)
    for key in expect.get("keys", []):
        assert key in body, (what, key, body)
    if "items" in expect:
        assert isinstance(body, list) and len(body) == len(expect["items"]), (what, body)
        for want, got in zip(expect["items"], body, strict=True):
            if isinstance(want, dict) and "code" in want:
                assert isinstance(got, list) and got[0] == want["code"], (what, got)
            else:
                assert got == want, (what, got)
    assert isinstance(frame[3], int) and frame[3] >= 1, (what, "reply carries the epoch")


def test_golden_session_replays_against_a_standalone_broker(
        start_broker: Callable[..., Proc]) -> None:
    broker = start_broker("b1")
    vectors = json.loads(pv.PATH.read_text(encoding="utf-8"))
    sock = socket.create_connection((broker.host, broker.port), timeout=10)
    dec = FrameDecoder()
    inbox: list[Any] = []
    try:
        for vec in vectors["requests"]:
            sock.sendall(bytes.fromhex(vec["hex"]))
            while not any(f[0] == vec["req_id"] and f[1] != "push" for f in inbox):
                data = sock.recv(65536)
                assert data, f"broker closed the connection after {vec['op']}"
                inbox.extend(dec.feed(data))
            reply = next(f for f in inbox if f[0] == vec["req_id"] and f[1] != "push")
            inbox.remove(reply)
            check(pv.from_json(vec["expect"]), reply, f"{vec['req_id']} {vec['op']}")
    finally:
        sock.close()
