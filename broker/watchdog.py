"""Event-loop stall watchdog (diagnostics, opt-in: SHARDQ_WATCHDOG_MS=N).

A thread checks that the loop ticked within N ms; when it did not, it logs
the main thread's current stack once per stall, so a stall in production
names the code that held the loop (or the GIL) instead of only a latency.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback

log = logging.getLogger("shardq.broker.watchdog")


def start(loop: asyncio.AbstractEventLoop, threshold_ms: int) -> threading.Event:
    """Watch `loop` from a daemon thread; set the returned event to stop."""
    stop = threading.Event()
    last = [time.monotonic()]
    main_id = threading.main_thread().ident
    tick_s = threshold_ms / 4000.0

    def tick() -> None:
        last[0] = time.monotonic()
        if not stop.is_set():
            loop.call_later(tick_s, tick)

    def watch() -> None:
        reported = 0.0
        while not stop.wait(tick_s):
            lag = time.monotonic() - last[0]
            if lag * 1000 < threshold_ms or last[0] == reported:
                continue
            reported = last[0]
            frame = sys._current_frames().get(main_id or 0)
            stack = "".join(traceback.format_stack(frame)[-10:]) if frame else "?"
            log.warning("event loop stalled for %.0f ms so far, at:\n%s", lag * 1000, stack)

    loop.call_soon_threadsafe(tick)
    threading.Thread(target=watch, name="loop-watchdog", daemon=True).start()
    return stop
