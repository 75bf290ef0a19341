"""Sans-IO wire codec: bytes in, frames out (docs/design.md §4).

A frame is a 4-byte big-endian length followed by one msgpack value. This
module never touches sockets or asyncio, so it is tested by feeding bytes.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from shardq.errors import BadRequestError, TooLargeError

DEFAULT_MAX_FRAME = 16 * 1024 * 1024
_HEADER = struct.Struct(">I")


def encode_frame(value: Any) -> bytes:
    """Pack one value as a length-prefixed msgpack frame."""
    body: bytes = msgpack.packb(value, use_bin_type=True)
    return _HEADER.pack(len(body)) + body


def encode_body(body: bytes) -> bytes:
    """Frame an already packed msgpack body."""
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Incremental decoder: `feed(data)` returns the complete frames so far.

    The buffer holds at most one partial frame plus what arrived with it, so
    a peer cannot make it grow past `max_frame` + one read: an oversized
    length prefix is refused before its body is buffered (DoS bound).
    """

    __slots__ = ("_buf", "_max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max_frame = max_frame

    @property
    def max_frame(self) -> int:
        return self._max_frame

    @max_frame.setter
    def max_frame(self, n: int) -> None:
        """Change the limit for the frames not decoded yet (a broker raises it
        once HELLO succeeded: pre-auth input stays small, docs/design.md §4)."""
        self._max_frame = n

    def feed(self, data: bytes, limit: int = 0) -> list[Any]:
        """Add bytes; return every complete decoded frame.

        `limit` > 0 stops after that many frames; the rest stays buffered for
        the next call (`feed(b"")`), so a caller can act on one frame (HELLO)
        before the limit for the next ones is decided.

        Raises:
            TooLargeError: a length prefix exceeds the frame limit. The stream
                cannot be resynchronised after that; the caller closes it.
            BadRequestError: a complete frame is not valid msgpack. The frame
                boundary is known, so the stream stays usable.
        """
        buf = self._buf
        buf += data
        frames: list[Any] = []
        pos = 0
        end = len(buf)
        while end - pos >= 4 and (not limit or len(frames) < limit):
            (size,) = _HEADER.unpack_from(buf, pos)
            if size > self._max_frame:
                del buf[:]
                raise TooLargeError(f"frame of {size} bytes exceeds limit {self._max_frame}")
            if end - pos - 4 < size:
                break
            start = pos + 4
            pos = start + size
            try:
                frames.append(msgpack.unpackb(buf[start:pos], raw=False, use_list=True))
            except Exception as exc:  # any decode failure is the peer's bad input
                frames.append(_BadFrame(str(exc) or type(exc).__name__))
        if pos:
            del buf[:pos]
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buf)


class _BadFrame:
    """Marker for a frame that was delimited correctly but did not decode."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def is_bad_frame(value: Any) -> bool:
    return isinstance(value, _BadFrame)


def bad_frame_error(value: Any) -> BadRequestError:
    return BadRequestError(f"undecodable frame: {value.reason}")
