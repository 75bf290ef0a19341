"""Baseline for bench_core: a plain msgpack echo-style server over shardq's framing.

It decodes each frame and answers `[req_id, "ok", [ids...], 0]` (one id per
job, like an ADD reply), with no queue logic and no storage: the cost of the
wire alone. Prints `READY host:port`.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

from shardq.codec import FrameDecoder, encode_frame


class Echo(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.t = transport
        self.dec = FrameDecoder()

    def data_received(self, data: bytes) -> None:
        out = []
        for fr in self.dec.feed(data):
            jobs = fr[2].get("jobs", []) if isinstance(fr[2], dict) else []
            out.append(encode_frame([fr[0], "ok", [j[0] for j in jobs], 0]))
        self.t.write(b"".join(out))


async def main() -> None:
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(Echo, "127.0.0.1", 0)
    print(f"READY 127.0.0.1:{srv.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        r.run(main())
