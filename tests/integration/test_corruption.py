"""Damaged data files (broker/integrity.py): byte flips in a copy of a
stopped broker's file are found at start, named, never served; --salvage
starts and quarantines them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import msgpack

from tests.integration.rawwire import RawConn, add_args
from tests.integration.scrape import metric

N = 200


def _stopped_broker_copy(start_broker, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    data = tmp_path / "orig"
    b = start_broker("b1", data_dir=data)
    c = RawConn(b.addr)
    jobs = [[f"j{i:04d}", "n", msgpack.packb(b"PAYLOAD-%04d-" % i + b"z" * 40), None]
            for i in range(N)]
    assert len(c.ok("ADD", {"queue": "q", "jobs": jobs})) == N
    c.close()
    assert b.terminate() == 0  # checkpointed: every job is a row of the jobs table
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    return copy


def _flip(path: Path, needle: bytes, bits: int = 3, skip: int = 0) -> None:
    raw = bytearray(path.read_bytes())
    at = raw.index(needle) + skip
    for bit in range(bits):
        raw[at + bit] ^= 1 << (bit + 1)
    path.write_bytes(bytes(raw))


def _start(data: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardq", "broker", "--id", "b1", "--port", "0",
                           "--data-dir", str(data), *extra],
                          capture_output=True, text=True, timeout=60)


def test_flipped_bits_in_job_data_refuse_the_start_and_salvage_quarantines(
        start_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = _stopped_broker_copy(start_broker, tmp_path)
    _flip(data / "broker.db", b"PAYLOAD-0017-", skip=9)
    r = _start(data)
    assert r.returncode == 2, r.stderr
    assert "broker.db is damaged" in r.stderr and "id 'j0017'" in r.stderr
    assert "checksum" in r.stderr and "Traceback" not in r.stderr
    # --salvage: up, without the damaged job, which is listed and counted.
    b = start_broker("b1", "--salvage", "--metrics-port", "0", data_dir=data)
    c = RawConn(b.addr)
    assert c.ok("COUNTS", {"queue": "q"})["waiting"] == N - 1
    assert c.ok("GET_JOB", {"queue": "q", "id": "j0017"}) is None
    assert c.ok("GET_JOB", {"queue": "q", "id": "j0018"})["data"] == msgpack.packb(
        b"PAYLOAD-0018-" + b"z" * 40)
    assert c.ok("STATS", {})["quarantined"] == 1
    assert metric(b, "shardq_broker_quarantined_jobs") == 1
    (entry,) = [json.loads(line) for line in
                (data / "broker.db.quarantine.jsonl").read_text().splitlines()]
    assert entry["id"] == "j0017" and entry["table"] == "jobs" and entry["blob"]
    c.close()
    b.terminate()
    # The damaged row is gone from the file: a plain start works again.
    b2 = start_broker("b1", data_dir=data)
    assert RawConn(b2.addr).ok("COUNTS", {"queue": "q"})["waiting"] == N - 1


def test_a_flipped_byte_in_a_job_id_is_found_not_silently_dropped(
        start_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = _stopped_broker_copy(start_broker, tmp_path)
    _flip(data / "broker.db", b"j0042", bits=1, skip=3)
    r = _start(data, "--verify")
    assert r.returncode == 2, r.stderr
    assert "broker.db is damaged" in r.stderr and "Traceback" not in r.stderr


def test_a_structural_flip_is_a_clear_refusal_not_a_traceback(
        start_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = _stopped_broker_copy(start_broker, tmp_path)
    db = data / "broker.db"
    raw = bytearray(db.read_bytes())
    for page in range(1, len(raw) // 4096):
        raw[page * 4096] ^= 0xFF  # every b-tree page's type byte
    db.write_bytes(bytes(raw))
    r = _start(data)
    assert r.returncode == 2, r.stderr
    assert "broker.db is damaged" in r.stderr and "Traceback" not in r.stderr


def test_an_undamaged_file_starts_and_its_rows_are_sealed(start_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = _stopped_broker_copy(start_broker, tmp_path)
    b = start_broker("b1", "--verify", data_dir=data)
    c = RawConn(b.addr)
    assert c.ok("COUNTS", {"queue": "q"})["waiting"] == N
    assert c.ok("STATS", {})["quarantined"] == 0
    c.ok("ADD", add_args("q", "more"))
