"""--max-memory is a bound on what requests are about to add (docs/design.md §2)."""

from __future__ import annotations

import threading
from pathlib import Path

import msgpack

from tests.integration.rawwire import RawConn

MB = 1024 * 1024


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def test_parallel_bulk_adds_stop_at_max_memory(start_broker) -> None:  # type: ignore[no-untyped-def]
    probe = start_broker("probe", "--fast")
    base = _status_kb(probe.pid, "VmRSS") * 1024
    probe.kill()
    limit = base + 120 * MB
    b = start_broker("b1", "--fast", "--max-memory", str(limit))
    data = msgpack.packb(b"x" * 1000)
    accepted: list[int] = [0] * 4
    busy: list[str] = []

    def push(n: int) -> None:
        c = RawConn(b.addr)
        for frame in range(400):  # far more than fits: 400 x 5000 x 1 KB per connection
            jobs = [[f"c{n}-{frame}-{i}", "n", data, None] for i in range(5000)]
            reply = c.call("ADD", {"queue": f"q{n}", "jobs": jobs})
            if reply[1] == "BUSY":
                busy.append(reply[2]["message"])
                break
            assert reply[1] == "ok"
            accepted[n] += len(reply[2])
        c.close()

    threads = [threading.Thread(target=push, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(busy) == 4 and all("memory limit" in m for m in busy), busy
    peak = _status_kb(b.pid, "VmHWM") * 1024
    # Each connection's last frame (~5 MB, ~25 MB decoded) is in memory before it
    # is refused, and allocator arenas round up.
    assert peak <= limit + 60 * MB, (peak >> 20, limit >> 20, sum(accepted))
    # Nothing answered was lost, and the limit let a fair amount in.
    c = RawConn(b.addr)
    for n in range(4):
        assert c.ok("COUNTS", {"queue": f"q{n}"})["waiting"] == accepted[n]
    assert sum(accepted) >= 20_000
