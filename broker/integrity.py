"""Checksums on stored records, and what a damaged file does (README "Corruption").

Every job row and log row is written sealed: a marker byte, a CRC-32 of the
row's key and payload, then the payload. SQLite has no checksums of its own
on pages, so a flipped bit inside a record would otherwise be read back as
different job data, or a flipped byte in a key would make a job vanish. The
key is part of the CRC, so both are caught. The marker 0xC1 is the one byte
msgpack never uses, so rows written before sealing (plain msgpack) are told
apart and read unverified.

At start the broker runs SQLite's `quick_check` (`--verify`: the full
`integrity_check`) and verifies every row it loads. Damage stops the start
with a message naming the file and each damaged record (no traceback);
`--salvage` starts anyway, leaves the damaged jobs out, lists them in a
quarantine file next to the database and counts them in STATS.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MARK = 0xC1
_HEAD = 5


class DamagedRecord(ValueError):
    """A sealed record whose checksum does not match."""


def seal(key: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(key))
    return bytes([MARK]) + crc.to_bytes(4, "big") + payload


def job_sealer(queue: str) -> Callable[[str, bytes], bytes]:
    """`seal(job_key(queue, id), payload)` for many ids of one queue: the
    CRC of the key's queue part is computed once (CRC-32 is incremental)."""
    head = zlib.crc32(f"{queue}\0".encode())
    crc32, mark = zlib.crc32, bytes([MARK])

    def sealed(job_id: str, payload: bytes) -> bytes:
        return mark + crc32(payload, crc32(job_id.encode(), head)).to_bytes(4, "big") + payload

    return sealed


def unseal(key: bytes, blob: bytes) -> bytes:
    """The payload of `blob` (a legacy unsealed blob as is).

    Raises:
        DamagedRecord: the checksum does not match the key and payload.
    """
    if not blob or blob[0] != MARK:
        return blob
    if len(blob) < _HEAD:
        raise DamagedRecord("record shorter than its header")
    payload = blob[_HEAD:]
    if zlib.crc32(payload, zlib.crc32(key)) != int.from_bytes(blob[1:_HEAD], "big"):
        raise DamagedRecord("checksum mismatch")
    return payload


def job_key(queue: str, job_id: str) -> bytes:
    return f"{queue}\0{job_id}".encode()


def log_key(seq: int) -> bytes:
    return b"log:%d" % seq


@dataclass(slots=True)
class Damage:
    """What a start found wrong with a data file."""

    path: str
    problems: list[str] = field(default_factory=list)
    quarantined: list[dict[str, str]] = field(default_factory=list)

    def add(self, what: str, reason: str, **where: str) -> None:
        self.problems.append(f"{what}: {reason}")
        if where:
            self.quarantined.append({**where, "reason": reason})

    def report(self, limit: int = 20) -> str:
        shown = "\n".join(f"  - {p}" for p in self.problems[:limit])
        more = len(self.problems) - limit
        return (f"{self.path} is damaged ({len(self.problems)} problem(s)):\n{shown}"
                + (f"\n  ... and {more} more" if more > 0 else ""))

    def write_quarantine(self) -> Path:
        """List the damaged records in `<db>.quarantine.jsonl` (appended)."""
        out = Path(self.path + ".quarantine.jsonl")
        with out.open("a", encoding="utf-8") as f:
            for q in self.quarantined:
                f.write(json.dumps(q) + "\n")
        return out


class CorruptionError(Exception):
    """The data file is damaged and --salvage was not given."""

    def __init__(self, damage: Damage) -> None:
        super().__init__(damage.report() + "\nstart with --salvage to leave the damaged records "
                         "out (they are listed in a quarantine file), or restore the file")
        self.damage = damage
