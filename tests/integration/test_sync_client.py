"""`shardq.sync`: the blocking facade against a real broker, called from 16
threads at once: every add lands once, adds from the threads share bulk
frames (the async client's batching), errors arrive typed in the calling
thread, and the facade refuses calls from its own loop."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import shardq
import shardq.sync

THREADS = 16
PER_THREAD = 200


@pytest.fixture
def broker(start_broker):  # type: ignore[no-untyped-def]
    return start_broker("b1")


def test_sixteen_threads_add_and_read_through_one_sync_client(broker) -> None:  # type: ignore[no-untyped-def]
    with shardq.sync.connect(broker.addr, call_timeout=60) as client:
        q = client.queue("sync-q")
        assert client.queue("sync-q") is q
        start = threading.Barrier(THREADS)

        def producer(t: int) -> list[str]:
            start.wait(timeout=30)
            ids = [q.add("n", {"t": t, "i": i}) for i in range(PER_THREAD)]
            job = q.get_job(ids[-1])
            assert job is not None and job["data"] == {"t": t, "i": PER_THREAD - 1}
            return ids

        with ThreadPoolExecutor(THREADS) as pool:
            results = list(pool.map(producer, range(THREADS), timeout=90))
        ids = [jid for r in results for jid in r]
        assert len(set(ids)) == THREADS * PER_THREAD
        assert q.counts()["waiting"] == THREADS * PER_THREAD
        frames = client._client.add_frames_sent
        assert frames < THREADS * PER_THREAD / 2, f"{frames} ADD frames: adds were not batched"
        assert len(q.get_jobs("waiting", 0, 9)) == 10
        assert q.add_bulk([("n", {}), ("n", {})])[0] not in ids
        with pytest.raises(shardq.NotFoundError):
            q.promote_job("no-such-job")

        async def from_the_loop() -> None:
            q.counts()

        with pytest.raises(RuntimeError, match="own event loop"):
            client.run(from_the_loop())
    client.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        q.counts()


def test_connect_to_nothing_raises_and_leaves_no_thread() -> None:
    def facades() -> int:
        return sum(t.name == "shardq-sync" for t in threading.enumerate())

    before = facades()
    with pytest.raises(shardq.ShardqError):
        shardq.sync.connect("127.0.0.1:1", call_timeout=30, connect_timeout=0.5)
    assert facades() == before
