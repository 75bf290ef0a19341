"""A replica dropped while the primary's stream is mid-batch (docs/design.md §12).

The real engine on a temp dir and a running loop: a REPL_APPEND is logged on
the replica, and the replica is dropped in the same loop step, as when a
new map names another follower while the primary still streams here. The
batch is committed and answered before the file goes; a later append is
refused with a typed error. (Closing at once made the batch commit on the
closed file, and a failed commit stops the broker.)
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import msgpack
import pytest

from shardq.broker.engine import Broker, BrokerConfig
from shardq.broker.follower import replica_path
from shardq.errors import StaleTermError


class Sink:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.frames.append(data)

    def is_closing(self) -> bool:
        return False


async def _wait(cond: object, what: str, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():  # type: ignore[operator]
            await asyncio.sleep(0.01)


def test_a_replica_dropped_mid_batch_commits_answers_then_goes(tmp_path: Path) -> None:
    async def scenario() -> None:
        b = Broker(BrokerConfig("b1", str(tmp_path), coordinator="http://coordinator"))
        b.recover()
        b.start(asyncio.get_running_loop())
        followers = b.replication.followers
        sink = Sink()
        meta = {"v": 1, "kind": "meta", "queue": "q", "meta": {}}
        followers.on_append({"primary": "b2", "repl_epoch": 1, "reset": True,
                             "chunks": [meta], "seq": 1}, sink, 7)
        followers.drop("b2")  # same loop step: the batch is only logged so far
        with pytest.raises(StaleTermError, match="no longer follows b2"):
            followers.on_append({"primary": "b2", "repl_epoch": 1, "seq": 2}, sink, 8)
        await _wait(lambda: "b2" not in followers.replicas, "the replica to go")
        assert not os.path.exists(replica_path(str(tmp_path), "b2"))
        [frame] = sink.frames
        req_id, status, body, _ = msgpack.unpackb(frame[4:])
        assert (req_id, status, body) == (7, "ok", {"seq": 1})
        b.close()

    asyncio.run(scenario())
