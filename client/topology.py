"""The client's copy of the topology: patches, coalesced refreshes, change events.

`shardq.router.Topology` is pure data; this module adds the I/O policy
around it (docs/design.md §4, §5):

- `MOVED` patches one slot (or one override) in place;
- a reply carrying a newer epoch schedules a full refresh, coalesced so at
  most one fetch runs at a time and fetches start at most every 100 ms;
- a refresh asks each source in order (the coordinator when connected by
  URL, then the brokers) and keeps the first answer that is not older
  than what it holds, so a coordinator that is down does not stop routing.

Waiters (the worker's pull supervisor) call `wait_changed()` to learn that
routing may have changed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from shardq.errors import MovedError, ShardqError
from shardq.router import Topology

log = logging.getLogger("shardq.client")

TopologySource = Callable[[], Awaitable[Topology]]

REFRESH_MIN_INTERVAL_S = 0.1


class TopologyManager:
    """Holds the current `Topology` and keeps it fresh."""

    def __init__(self, topo: Topology, sources: Sequence[TopologySource] = (),
                 min_interval: float = REFRESH_MIN_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.topo = topo
        self.sources = list(sources)
        self.version = 0
        self.refreshes = 0
        self._min_interval = min_interval
        self._clock = clock
        self._last_fetch = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._closed = False

    # -- lookups ---------------------------------------------------------------

    def route(self, queue: str) -> tuple[str, str] | None:
        route: tuple[str, str] | None = self.topo.route(queue)
        return route

    @property
    def epoch(self) -> int:
        epoch: int = self.topo.epoch
        return epoch

    # -- changes -----------------------------------------------------------

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_changed(self, seen_version: int) -> int:
        """Wait until the version differs from `seen_version`; return it."""
        while self.version == seen_version and not self._closed:
            await self._changed.wait()
        return self.version

    def is_stale(self, err: MovedError) -> bool:
        """The broker that answered MOVED knows an older owner than our map."""
        if err.queue is not None:
            known = self.topo.overrides.get(err.queue)
            return known is not None and err.epoch < known[1]
        return 0 <= err.slot < len(self.topo.slot_epochs) and (
            err.epoch < self.topo.slot_epoch(err.slot))

    def patch(self, err: MovedError) -> None:
        """Apply one MOVED (slot or override) to the map."""
        if err.owner == "" or err.addr == "":
            return
        if err.queue is not None:
            self.topo.patch_override(err.queue, err.owner, err.addr, err.epoch)
        elif err.slot >= 0:
            self.topo.patch_slot(err.slot, err.owner, err.addr, err.epoch)
        self._bump()

    def replace(self, topo: Topology) -> bool:
        """Adopt `topo` unless it is older than the current map."""
        if topo.epoch < self.topo.epoch:
            return False
        self.topo = topo
        self._bump()
        return True

    def note_epoch(self, epoch: int) -> None:
        """A reply carried `epoch`: refresh in the background if it is newer."""
        if epoch > self.topo.epoch and not self._closed:
            self._start_refresh()

    # -- refresh -------------------------------------------------------------

    def _start_refresh(self) -> asyncio.Task[None]:
        task = self._task
        if task is None or task.done():
            task = self._task = asyncio.get_running_loop().create_task(self._refresh())
        return task

    async def refresh(self) -> None:
        """Fetch the whole map now (or join the fetch in flight).

        Never raises for an unreachable source: routing keeps the map it has.
        """
        if self._closed:
            return
        await asyncio.shield(self._start_refresh())

    async def _refresh(self) -> None:
        wait = self._last_fetch + self._min_interval - self._clock()
        if wait > 0:
            await asyncio.sleep(wait)
        self._last_fetch = self._clock()
        self.refreshes += 1
        for source in self.sources:
            try:
                topo = await source()
            except (ShardqError, OSError, TimeoutError, ValueError) as exc:
                log.info("topology source failed: %s", exc)
                continue
            if self.replace(topo):
                return
            # An older map than ours (a lagging source): try the next one.
        log.info("no topology source had a newer map; keeping epoch %d", self.topo.epoch)

    async def aclose(self) -> None:
        self._closed = True
        self._changed.set()
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                # Ours was cancelled on purpose; re-raise only if we are.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
