"""kill -9 at each step of a handoff, reached through failpoints (docs/design.md §6, §9).

One case per (process, failpoint): a coordinator (`--expect 2`) and brokers
b1, b2, each broker with an ack journal (`SHARDQ_ACK_JOURNAL`). Thirty
queues are filled, a worker completes some jobs, a few more are held active
under a long lock, then `POST /brokers/b1/drain` moves every slot of b1 to
b2 in many moves while producers keep adding and a slow worker keeps
acking. The process under test runs with `SHARDQ_FAILPOINTS=<point>=kill`,
so it SIGKILLs itself at that step of the first move that reaches it:

- b1 as the source: `broker.after_copy`, `before_freeze`, `after_freeze`,
  `after_catchup`, `before_cleanup` / `after_cleanup` (RELEASE);
- b2 as the target: `broker.after_prepare`, `before_activate`, `after_activate`;
- the coordinator: `coordinator.after_copy`, `after_freeze`, `before_commit`,
  `after_commit`, `after_activate`, `after_cleanup` (restart recovery: abort
  before the commit point, roll forward after it).

The killed process is started again without the failpoint (same id and
data dir; the coordinator on the same port, since the brokers have its
URL) and the drain must end by itself (aborted moves are planned again).
Then:

- no answered write is lost: every answered add is there exactly once, on
  its queue's owner, and the brokers' counts add up to the jobs present;
- one owner: the coordinator gives b2 all 4096 slots with nothing moving,
  both brokers serve that map, their STATS slots sum to 4096, and no queue
  is listed (op QUEUES) by both;
- held locks survive the move (same token accepted at the new owner), every
  answered job ends `completed`, and the union of the ack journals holds no
  (queue, job id) twice.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

import shardq
from shardq import protocol
from shardq.errors import BusyError, MovedError, TryAgainError, UnavailableError
from shardq.router import NUM_SLOTS, Topology
from tests.integration.rawwire import RawConn, add_args

from ..conftest import Proc
from .conftest import http_get

QUEUES = [f"fp-{i}" for i in range(30)]
PER_QUEUE = 100
PRE_COMPLETED = 500  # jobs a worker completes before the drain
HELD_QUEUES = 10  # queues with jobs held active (long lock) across the drain
HELD_PER_QUEUE = 2
HELD_LOCK_MS = 90_000
WORKER_LOCK_MS = 4_000  # a job whose ack a kill swallowed comes back within this
PRODUCERS = 2
MAX_PER_PRODUCER = 1_500
KILL_TIMEOUT_S = 30.0
RETRY_BUDGET_S = 8
DRAIN_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 40.0
# What a client may raise once its own retry budgets are spent (docs/design.md §4);
# any other error fails the test.
BUDGET_ERRORS = (TryAgainError, BusyError, UnavailableError, MovedError)

CASES = [
    # (failpoint, process it is armed in); the coordinator's retries and recovery after:
    ("broker.after_copy", "b1"),  # COPY retried (idempotent per move_id)
    ("broker.before_freeze", "b1"),  # FREEZE refused (no copy here): abort, re-planned
    ("broker.after_freeze", "b1"),  # frozen durably, CATCHUP refused: abort unfreezes
    ("broker.after_catchup", "b1"),  # target ready, source restarted: abort
    ("broker.before_cleanup", "b1"),  # committed, RELEASE retried until done
    ("broker.after_cleanup", "b1"),  # released durably, answer lost: RELEASE again
    ("broker.after_prepare", "b2"),  # COPY fails while the target is down, retried
    ("broker.before_activate", "b2"),  # committed: staging must survive the restart
    ("broker.after_activate", "b2"),  # activated durably, answer lost: ACTIVATE again
    ("coordinator.after_copy", "coordinator"),  # recovery aborts: the source only tapped
    ("coordinator.after_freeze", "coordinator"),  # recovery aborts: the source unfreezes
    ("coordinator.before_commit", "coordinator"),  # recovery aborts a ready target
    ("coordinator.after_commit", "coordinator"),  # recovery rolls forward
    ("coordinator.after_activate", "coordinator"),  # recovery releases the source
    ("coordinator.after_cleanup", "coordinator"),  # recovery re-sends RELEASE, closes
]

Key = tuple[str, str]


# ---------------------------------------------------------------- processes
class Rig:
    """The coordinator and b1, b2 as separate processes; one can carry a failpoint."""

    def __init__(self, procs: list[Proc], start_broker: Callable[..., Proc], tmp_path: Path,
                 point: str, victim: str) -> None:
        self.procs = procs
        self._start_broker = start_broker
        self.tmp = tmp_path
        self.point, self.victim = point, victim
        self.coord_dir = tmp_path / "coord"
        self.journals = {b: tmp_path / f"acks-{b}.tsv" for b in ("b1", "b2")}
        self.coordinator = self._coordinator(0, armed=victim == "coordinator")
        self.url = f"http://{self.coordinator.addr}"
        with ThreadPoolExecutor(2) as pool:  # both at once: a case starts a second sooner
            started = {b: pool.submit(self._broker, b, victim == b) for b in ("b1", "b2")}
            self.brokers = {b: f.result() for b, f in started.items()}

    def _env(self, armed: bool) -> dict[str, str]:
        return {"SHARDQ_FAILPOINTS": f"{self.point}=kill"} if armed else {}

    def _coordinator(self, port: int, armed: bool) -> Proc:
        # A shorter pre-commit retry budget (default 30 s): a move frozen when its target
        # restarts on a new port only aborts when the budget runs out (the xfail
        # test_target_restarted_on_a_new_port_...), and a case whose kill of b2 catches a
        # second move there should not wait 30 s for it.
        p = Proc(["coordinator", "--port", str(port), "--data-dir", str(self.coord_dir),
                  "--expect", "2", "--handoff-retry-budget-s", str(RETRY_BUDGET_S)],
                 env=self._env(armed), log_path=self.tmp / "coord.log")
        self.procs.append(p)
        return p

    def _broker(self, bid: str, armed: bool) -> Proc:
        env = {"SHARDQ_ACK_JOURNAL": str(self.journals[bid]), "SHARDQ_LOG_LEVEL": "INFO",
               **self._env(armed)}
        return self._start_broker(bid, "--coordinator", self.url,
                                  data_dir=self.tmp / f"{bid}-data", env=env)

    def victim_proc(self) -> Proc:
        return self.coordinator if self.victim == "coordinator" else self.brokers[self.victim]

    def restart_victim(self) -> Proc:
        """Start the killed process again, without the failpoint."""
        assert not self.victim_proc().alive()
        if self.victim == "coordinator":
            self.coordinator = self._coordinator(self.coordinator.port, armed=False)
            assert f"http://{self.coordinator.addr}" == self.url
            return self.coordinator
        self.brokers[self.victim] = self._broker(self.victim, armed=False)
        return self.brokers[self.victim]

    def logs(self, n: int = 2500) -> str:
        parts = []
        for path in sorted(self.tmp.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-n:]}")
        return "\n".join(parts)


def broker_states(url: str) -> dict[str, tuple[str, int]]:
    status = http_get(url, "/status") or {"brokers": []}
    return {b["id"]: (b["state"], b["slots"]) for b in status["brokers"]}


def topology(url: str) -> Topology | None:
    body = http_get(url, "/topology")
    return Topology.from_dict(body) if body else None


def raw(addr: str, op: str, args: Any) -> Any:
    conn = RawConn(addr, timeout=10.0)
    try:
        return conn.ok(op, args)
    finally:
        conn.close()


def journal_counts(paths: list[Path]) -> collections.Counter[Key]:
    acks: collections.Counter[Key] = collections.Counter()
    for path in paths:
        if path.exists():
            for line in path.read_text().splitlines():
                q, jid, _token = line.split("\t")
                acks[(q, jid)] += 1
    return acks


async def until(cond: Callable[[], Any], what: str, timeout: float,
                logs: Callable[[], str]) -> Any:
    """Poll a blocking `cond` (in a thread) until truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(cond)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}\n{logs()}")
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------- load
class Load:
    """Answered adds, held jobs, worker runs; the producers and the worker."""

    def __init__(self, client: shardq.Client) -> None:
        self.client = client
        self.answered: set[Key] = set()
        self.attempted: set[Key] = set()
        self.budget_errors: list[BaseException] = []
        self.other_errors: list[BaseException] = []
        self.handled: collections.Counter[Key] = collections.Counter()
        self.held: list[tuple[str, str, int]] = []  # (queue, id, token)
        self.slow = False
        self.stop = asyncio.Event()

    async def fill(self) -> None:
        async def one(q: str) -> None:
            ids = [f"{q}-j{n}" for n in range(PER_QUEUE)]
            self.attempted.update((q, i) for i in ids)
            got = await self.client.queue(q).add_bulk(
                [("job", {"n": n}, {"job_id": i}) for n, i in enumerate(ids)])
            assert got == ids
            self.answered.update((q, i) for i in ids)

        await asyncio.gather(*(one(q) for q in QUEUES))

    async def handle(self, job: Any) -> str:
        self.handled[(job.queue, job.id)] += 1
        if self.slow:
            await asyncio.sleep(0.04)
        return "ok"

    async def hold(self) -> None:
        """Pull a few jobs under a long lock, as a worker busy with them would."""
        for q in QUEUES[::len(QUEUES) // HELD_QUEUES]:
            jobs = await self.client._call(q, protocol.PULL, {
                "queues": [q], "count": HELD_PER_QUEUE, "lock_ms": HELD_LOCK_MS})
            assert len(jobs) == HELD_PER_QUEUE, (q, jobs)
            self.held.extend((w[protocol.J_QUEUE], w[protocol.J_ID], w[protocol.J_TOKEN])
                             for w in jobs)

    async def ack_held(self) -> list[Any]:
        """Ack the held jobs as a worker does: through the client's bulk path, which
        re-routes an item answered MOVED (the client's map may predate the drain)."""
        items = [[q, jid, token, None] for q, jid, token in self.held]
        outcomes = await self.client._cluster.bulk(
            protocol.ACK, items, lambda item: item[0], lambda _bid, sub, _rnd: {"items": sub})
        for (q, jid, _token), outcome in zip(self.held, outcomes, strict=True):
            if outcome is None:
                self.handled[(q, jid)] += 1
        return outcomes

    async def produce(self, p: int) -> None:
        for i in range(MAX_PER_PRODUCER):
            if self.stop.is_set():
                return
            q = QUEUES[(i * 7 + p) % len(QUEUES)]
            jid = f"p{p}-{i}"
            self.attempted.add((q, jid))
            try:
                await self.client.queue(q).add("job", {"i": i}, job_id=jid)
            except BUDGET_ERRORS as exc:
                self.budget_errors.append(exc)  # not answered: may or may not be there
                await asyncio.sleep(0.05)
                continue
            except shardq.ShardqError as exc:
                self.other_errors.append(exc)
                continue
            self.answered.add((q, jid))


# ---------------------------------------------------------------- the scenario
def bootstrapped(url: str) -> Topology | None:
    topo = topology(url)
    if topo is None or topo.epoch < 1:
        return None
    counts = topo.slot_counts()
    return topo if counts.get("b1", 0) > 0 and counts.get("b2", 0) > 0 else None


async def prepare_load(load: Load, rig: Rig) -> None:
    """Fill the queues, hold a few jobs active, complete some others."""
    client = load.client
    await load.fill()
    await load.hold()
    pre = client.worker(QUEUES, load.handle, concurrency=8, lock_ms=WORKER_LOCK_MS)
    pre_task = asyncio.create_task(pre.run())
    await until(lambda: sum(load.handled.values()) >= PRE_COMPLETED,
                "the first jobs to complete", 20, rig.logs)
    await pre.close()
    await pre_task
    # An answered add on every queue after the pulls: the locks are durable too.
    for q in QUEUES:
        jid = f"{q}-after-hold"
        load.attempted.add((q, jid))
        await client.queue(q).add("job", {}, job_id=jid)
        load.answered.add((q, jid))


async def kill_and_restart(rig: Rig) -> None:
    """Wait for the failpoint to SIGKILL its process, then start that process again."""
    proc = rig.victim_proc()
    try:
        code = await asyncio.to_thread(proc.popen.wait, KILL_TIMEOUT_S)
    except Exception as exc:
        raise AssertionError(f"{rig.victim} did not die at {rig.point}\n{rig.logs()}") from exc
    assert code == -9, f"{rig.victim} exited {code}, not by SIGKILL\n{rig.logs()}"
    assert proc.log_path is not None
    assert f"failpoint {rig.point}: kill" in proc.log_path.read_text(errors="replace")
    await asyncio.sleep(0.3)  # clients run into the dead process for a moment
    await asyncio.to_thread(rig.restart_victim)


async def work_off(client: shardq.Client, rig: Rig) -> None:
    """Until no queue has a waiting, delayed or active job."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        counts = await asyncio.gather(*(client.queue(q).counts() for q in QUEUES))
        if not any(c["waiting"] or c["active"] or c["delayed"] for c in counts):
            return
        left = {q: c for q, c in zip(QUEUES, counts, strict=True)
                if c["waiting"] or c["active"] or c["delayed"]}
        assert time.monotonic() < deadline, f"jobs left unfinished: {left}\n{rig.logs()}"
        await asyncio.sleep(0.2)


async def scenario(rig: Rig) -> tuple[Load, list[Any]]:
    url = rig.url
    topo = await until(lambda: bootstrapped(url), "bootstrap", 20, rig.logs)
    assert {topo.owner_of(q) for q in QUEUES} == {"b1", "b2"}
    client = await shardq.connect(url)
    load = Load(client)
    try:
        await prepare_load(load, rig)
        # Drain b1 under load: a slow worker and producers keep going.
        load.slow = True
        worker = client.worker(QUEUES, load.handle, concurrency=8, lock_ms=WORKER_LOCK_MS)
        worker_task = asyncio.create_task(worker.run())
        producers = [asyncio.create_task(load.produce(p)) for p in range(PRODUCERS)]
        r = await asyncio.to_thread(httpx.post, f"{url}/brokers/b1/drain", json={}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["moves"] > 1, r.json()

        await kill_and_restart(rig)  # at the first move reaching the failpoint
        await until(lambda: broker_states(url).get("b1") == ("drained", 0),
                    "the drain of b1 to finish after the restart", DRAIN_TIMEOUT_S, rig.logs)
        if rig.victim == "coordinator":  # its restart found the move(s) it was killed in
            assert "unfinished moves" in (rig.tmp / "coord.log").read_text()
        load.stop.set()
        await asyncio.gather(*producers)
        assert not load.other_errors, f"non-budget client errors: {load.other_errors[:5]}"

        # Held locks are still valid at the new owner, with the same token.
        held_outcomes = await load.ack_held()
        assert held_outcomes == [None] * len(load.held), (
            f"held locks not honoured after the move: {held_outcomes}\n{rig.logs()}")
        load.slow = False
        await work_off(client, rig)
        await worker.close()
        await worker_task
        return load, held_outcomes
    finally:
        await client.aclose()


# ---------------------------------------------------------------- the checks
def check_one_owner(url: str) -> dict[str, Any]:
    """Every slot is b2's in the coordinator's map and in both brokers' (STATS, TOPOLOGY,
    QUEUES); returns b2's QUEUES answer."""
    topo = topology(url)
    assert topo is not None
    assert topo.moving == [], topo.moving
    assert topo.slot_counts() == {"b1": 0, "b2": NUM_SLOTS}
    assert all(topo.owner_of_slot(s) == "b2" for s in range(NUM_SLOTS))
    addrs = {b: topo.addr_of(b) or "" for b in ("b1", "b2")}
    deadline = time.monotonic() + 10
    while not all((raw(a, "TOPOLOGY", {}) or {}).get("epoch") == topo.epoch
                  for a in addrs.values()):
        assert time.monotonic() < deadline, "the brokers do not serve the coordinator's map"
        time.sleep(0.1)
    for a in addrs.values():
        assert Topology.from_dict(raw(a, "TOPOLOGY", {})).slot_owners == topo.slot_owners
    stats = {b: raw(a, "STATS", {}) for b, a in addrs.items()}
    assert {b: s["slots"] for b, s in stats.items()} == {"b1": 0, "b2": NUM_SLOTS}
    listed = {b: raw(a, "QUEUES", {}) for b, a in addrs.items()}
    assert set(listed["b1"]) & set(listed["b2"]) == set()
    assert listed["b1"] == {}, f"b1 still lists queues: {sorted(listed['b1'])[:5]}"
    assert set(listed["b2"]) == set(QUEUES)
    return dict(listed["b2"])


def check_jobs(url: str, load: Load, counts: dict[str, Any]) -> set[Key]:
    """No answered add lost; the owner's counts add up; every job completed.
    Returns the jobs present."""
    async def lookup() -> dict[Key, Any]:
        async with await shardq.connect(url) as client:
            keys = sorted(load.attempted)
            jobs = await asyncio.gather(*(client.queue(q).get_job(j) for q, j in keys))
            return dict(zip(keys, jobs, strict=True))

    found = asyncio.run(lookup())
    present = {k for k, job in found.items() if job is not None}
    lost = load.answered - present
    assert not lost, f"{len(lost)} answered adds lost, e.g. {sorted(lost)[:5]}"
    per_queue = collections.Counter(q for q, _ in present)
    for q in QUEUES:
        c = counts[q]
        total = c["waiting"] + c["delayed"] + c["active"] + c["completed"] + c["failed"]
        assert total == per_queue[q] == c["completed"], (q, c, per_queue[q])
    not_completed = {k: found[k]["state"] for k in present if found[k]["state"] != "completed"}
    assert not not_completed, f"jobs not completed: {list(not_completed.items())[:5]}"
    return present


# ---------------------------------------------------------------- the test
@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("point", "victim"), CASES, ids=[f"{v}:{p}" for p, v in CASES])
def test_kill_at_a_handoff_step_loses_nothing_keeps_one_owner_and_acks_once(
        procs: list[Proc], start_broker: Callable[..., Proc], tmp_path: Path,
        point: str, victim: str) -> None:
    rig = Rig(procs, start_broker, tmp_path, point, victim)

    async def bounded() -> tuple[Load, list[Any]]:
        async with asyncio.timeout(105):
            return await scenario(rig)

    load, held_outcomes = asyncio.run(bounded())

    counts = check_one_owner(rig.url)
    assert held_outcomes == [None] * len(load.held), (
        f"held locks not honoured after the move: {held_outcomes}")
    present = check_jobs(rig.url, load, counts)
    acks = journal_counts(list(rig.journals.values()))
    twice = {k: n for k, n in acks.items() if n > 1}
    assert not twice, f"acks accepted twice: {list(twice.items())[:5]}\n{rig.logs()}"
    assert set(acks) <= load.handled.keys()
    missing = present - set(acks)
    assert not missing, (f"{len(missing)} completed jobs have no accepted ack in the journals, "
                         f"e.g. {sorted(missing)[:5]}")
    print(f"{point}: {len(load.answered)} answered adds ({len(load.budget_errors)} past a "
          f"client budget), {len(acks)} acks, {sum(load.handled.values())} runs")


# ---------------------------------------------------------------- a retried copy
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_retried_copy_after_a_source_restart_does_not_bring_back_removed_jobs(
        procs: list[Proc], start_broker: Callable[..., Proc], tmp_path: Path) -> None:
    """Source killed at `broker.after_copy` of a one-queue move; the coordinator retries
    the copy (it is idempotent per move_id). Before the retry reaches the restarted
    source, a worker completes the queue's jobs there (`remove_on_complete`: removed,
    tombstones kept). The retried snapshot no longer holds them, but the target's staging
    still has them from the first copy: after the move they are waiting again, and a
    second ack of each is accepted (ack journals).

    `coordinator.before_copy=sleep(2000)` holds every copy attempt for 2 s (it blocks the
    coordinator's loop, so the retry cannot start while the source restarts): the
    completions land at least 4 s before the retried copy, about 1.5 s after the kill.
    """
    journals = {b: tmp_path / f"acks-{b}.tsv" for b in ("b1", "b2")}
    coord = Proc(["coordinator", "--port", "0", "--data-dir", str(tmp_path / "coord"),
                  "--expect", "2"],
                 env={"SHARDQ_FAILPOINTS": "coordinator.before_copy=sleep(2000)"},
                 log_path=tmp_path / "coord.log")
    procs.append(coord)
    url = f"http://{coord.addr}"

    def broker(bid: str, failpoints: str | None = None) -> Proc:
        env = {"SHARDQ_ACK_JOURNAL": str(journals[bid]), "SHARDQ_LOG_LEVEL": "INFO"}
        if failpoints:
            env["SHARDQ_FAILPOINTS"] = failpoints
        return start_broker(bid, "--coordinator", url, data_dir=tmp_path / f"{bid}-data", env=env)

    b1 = broker("b1", "broker.after_copy=kill")
    broker("b2")
    deadline = time.monotonic() + 20
    while (topo := bootstrapped(url)) is None:
        assert time.monotonic() < deadline, "bootstrap"
        time.sleep(0.05)
    queue = next(q for q in (f"recopy-{i}" for i in range(1000)) if topo.owner_of(q) == "b1")
    ids = [f"j{n}" for n in range(20)]

    async def fill() -> None:
        async with await shardq.connect(url) as client:
            assert await client.queue(queue).add_bulk(
                [("job", {}, {"job_id": i, "remove_on_complete": True}) for i in ids]) == ids

    asyncio.run(fill())
    r = httpx.post(f"{url}/queues/{queue}/move", json={"to": "b2"}, timeout=10)
    assert r.status_code == 200, r.text
    assert b1.popen.wait(timeout=30) == -9  # killed after its first copy of the move
    b1 = broker("b1")
    conn = RawConn(b1.addr)
    try:
        jobs = conn.ok("PULL", {"queues": [queue], "count": 100, "lock_ms": 30_000})
        assert sorted(w[protocol.J_ID] for w in jobs) == sorted(ids)
        acks = conn.ok("ACK", {"items": [[queue, w[protocol.J_ID], w[protocol.J_TOKEN], None]
                                         for w in jobs]})
        assert acks == [None] * len(ids)  # answered: completed and removed at b1
    finally:
        conn.close()

    deadline = time.monotonic() + 60
    while (topo := topology(url)) is None or topo.owner_of(queue) != "b2" or topo.moving:
        assert time.monotonic() < deadline, "the move did not finish"
        time.sleep(0.1)
    b2_addr = topo.addr_of("b2")
    assert b2_addr is not None
    conn = RawConn(b2_addr)
    try:
        counts = conn.ok("COUNTS", {"queue": queue})
        again = conn.ok("PULL", {"queues": [queue], "count": 100, "lock_ms": 30_000})
        if again:  # a worker would run them again: show it in the journals too
            conn.ok("ACK", {"items": [[queue, w[protocol.J_ID], w[protocol.J_TOKEN], None]
                                      for w in again]})
    finally:
        conn.close()
    acks_seen = journal_counts(list(journals.values()))
    twice = sorted(k for k, n in acks_seen.items() if n > 1)
    assert counts["waiting"] == 0 and not again, (
        f"{len(again)} jobs completed and removed at the source are waiting again at the "
        f"target: {counts}")
    assert not twice, f"acks accepted twice: {twice[:5]}"


# ---------------------------------------------------------------- target moved while frozen
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_target_restarted_on_a_new_port_while_the_source_is_frozen_unfreezes_promptly(
        procs: list[Proc], start_broker: Callable[..., Proc], tmp_path: Path) -> None:
    """kill -9 of the target between FREEZE and CATCHUP of a one-queue move (the
    window is held open by `coordinator.after_freeze=sleep(3000)`, which blocks the
    coordinator's loop right after the source answered the freeze); the target comes
    back at once with a new port, as `--port 0` (or a new `--advertise`) gives it.
    Writes to the moving queue must resume within the client's TRYAGAIN budget,
    whether the move then commits or aborts (docs/design.md §9.3: a pause of milliseconds)."""
    coord = Proc(["coordinator", "--port", "0", "--data-dir", str(tmp_path / "coord"),
                  "--expect", "2"],
                 env={"SHARDQ_FAILPOINTS": "coordinator.after_freeze=sleep(3000)"},
                 log_path=tmp_path / "coord.log")
    procs.append(coord)
    url = f"http://{coord.addr}"

    def broker(bid: str) -> Proc:
        return start_broker(bid, "--coordinator", url, data_dir=tmp_path / f"{bid}-data",
                            env={"SHARDQ_LOG_LEVEL": "INFO"})

    b1, b2 = broker("b1"), broker("b2")
    deadline = time.monotonic() + 20
    while (topo := bootstrapped(url)) is None:
        assert time.monotonic() < deadline, "bootstrap"
        time.sleep(0.05)
    queue = next(q for q in (f"frozen-{i}" for i in range(1000)) if topo.owner_of(q) == "b1")
    r = httpx.post(f"{url}/queues/{queue}/move", json={"to": "b2"}, timeout=10)
    assert r.status_code == 200, r.text

    # Add at b1 until it answers TRYAGAIN (frozen): the freeze is durable and answered.
    conn = RawConn(b1.addr)
    try:
        deadline = time.monotonic() + 30
        n = 0
        while True:
            n += 1
            reply = conn.call("ADD", add_args(queue, f"before-{n}"))
            if reply[1] == "TRYAGAIN" and "frozen" in str(reply[2]):
                break
            assert reply[1] in ("ok", "TRYAGAIN"), reply  # TRYAGAIN: no map yet
            assert time.monotonic() < deadline, "the source never froze"
            time.sleep(0.01)
    finally:
        conn.close()
    b2.kill()
    b2 = broker("b2")
    back = time.monotonic()

    async def first_accepted_add() -> float:
        async with await shardq.connect(url) as client:
            while True:
                try:
                    await client.queue(queue).add("job", {}, job_id="after-restart")
                    return time.monotonic() - back
                except BUDGET_ERRORS:
                    if time.monotonic() - back > 10:
                        return float("inf")

    waited = asyncio.run(first_accepted_add())
    assert waited < 10, (
        f"writes to {queue} still refused 10 s after the target came back (the source "
        f"stays frozen)\n" + (tmp_path / "coord.log").read_text()[-2000:])
