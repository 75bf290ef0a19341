"""A full disk is not fatal (README "Disk full"): adds are refused BUSY with
a reason, reads and acks go on, nothing answered is lost, and the broker
resumes by itself when space returns. On a real 20 MB tmpfs."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from tests.integration.rawwire import RawConn
from tests.integration.scrape import metric

DATA = msgpack.packb(b"x" * 10_000)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 20 MB tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _stats(addr: str) -> dict:  # type: ignore[type-arg]
    c = RawConn(addr)
    try:
        return c.ok("STATS", {})  # type: ignore[no-any-return]
    finally:
        c.close()


@pytest.mark.parametrize(("limit", "filler_mb"), [
    (4 * 1024 * 1024, 6),  # the disk alarm refuses adds before a commit fails
    (0, 14),  # no alarm: a commit fails for lack of space; its add waits
])
def test_a_full_disk_refuses_adds_keeps_acks_and_resumes(
        start_broker, small_fs: Path, limit: int, filler_mb: int) -> None:  # type: ignore[no-untyped-def]
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * (filler_mb * 1024 * 1024))  # freed later: "space returns"
    data_dir = small_fs / "b1"
    b = start_broker("b1", "--disk-free-limit", str(limit), "--metrics-port", "0",
                     data_dir=data_dir, env={"SHARDQ_LOG_LEVEL": "INFO"})
    work = RawConn(b.addr)
    work.ok("ADD", {"queue": "w", "jobs": [[f"w{i}", "n", b"\x01", None] for i in range(5)]})
    push = RawConn(b.addr)
    answered: list[str] = []
    held: int | None = None  # req_id of an add whose commit found no space
    for frame in range(200):
        ids = [f"f{frame}-{i}" for i in range(100)]
        push.sock.settimeout(3)
        try:
            reply = push.call("ADD", {"queue": "q", "jobs": [[j, "n", DATA, None] for j in ids]})
        except TimeoutError:
            held = push.rid
            break
        if reply[1] == "BUSY":
            assert "disk is full" in reply[2]["message"]
            break
        assert reply[1] == "ok", reply
        answered.extend(ids)
    else:
        raise AssertionError("the disk never filled")
    assert _stats(b.addr)["disk_full"] is True
    assert metric(b, "shardq_broker_disk_full") == 1
    assert metric(b, "shardq_broker_disk_full_episodes_total") >= 1
    assert b.alive()
    # Adds are refused with a reason, at once.
    other = RawConn(b.addr)
    busy = other.call("ADD", {"queue": "q", "jobs": [["late", "n", DATA, None]]})
    assert busy[1] == "BUSY" and "disk is full" in busy[2]["message"]
    # Reads go on; a pull hands a job out and its ack is taken (answered
    # once a commit holds it).
    assert other.ok("COUNTS", {"queue": "q"})["waiting"] >= len(answered)
    (job,) = work.ok("PULL", {"queues": ["w"], "count": 1})
    work.send_raw(__import__("shardq.codec", fromlist=["x"]).encode_frame(
        [999, "ACK", {"items": [[job[0], job[1], job[4], None]]}]))
    # Space returns: the broker resumes by itself.
    filler.unlink()
    push.sock.settimeout(20)
    if held is not None:
        late = push.recv_frame()
        assert late[0] == held and late[1] == "ok"
        answered.extend(late[2])
    work.sock.settimeout(20)
    ack = work.recv_frame()
    assert ack[0] == 999 and ack[1] == "ok" and ack[2] == [None]
    deadline = time.monotonic() + 20
    while _stats(b.addr)["disk_full"]:
        assert time.monotonic() < deadline, "the broker did not resume"
        time.sleep(0.1)
    assert other.ok("ADD", {"queue": "q", "jobs": [["after", "n", b"\x01", None]]}) == ["after"]
    assert metric(b, "shardq_broker_disk_full") == 0
    if limit == 0:
        assert held is not None  # the path where a commit really failed
    answered.append("after")
    # Nothing answered was lost, across a kill -9 and a restart on the small disk.
    b.kill()
    b2 = start_broker("b1", "--disk-free-limit", "0", data_dir=data_dir)
    c = RawConn(b2.addr)
    counts = c.ok("COUNTS", {"queue": "q"})
    assert counts["waiting"] == len(answered)
    for jid in (answered[0], answered[-1]):
        assert c.ok("GET_JOB", {"queue": "q", "id": jid})["state"] == "waiting"
    assert c.ok("GET_JOB", {"queue": "w", "id": job[1]})["state"] == "completed"
