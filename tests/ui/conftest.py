"""Browser tests of the coordinator's dashboard: Debian's headless Chromium through
selenium and chromium-driver (the Makefile installs both), against a real cluster.

- `ui_cluster(token=None, *coordinator_args)`: a coordinator started with
  `--ui-actions` and brokers b1..b3, each its own process (READY lines,
  killed by pid at teardown), synced on the coordinator's map.
- `browser`: a headless Chromium with a fresh profile, closed at teardown.
- `shot(driver, name)`: a screenshot into the output dir (tests/output/ui, or
  $SHARDQ_TEST_OUTPUT/ui), gitignored; README's docs/dashboard.png is one.
- `LoopThread`: an asyncio loop in a thread for the client and workers, so
  the synchronous selenium calls and the async client run side by side.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from shardq.router import Topology

from ..cluster.conftest import BROKERS, broker_epoch
from ..conftest import Proc

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 30.0
OUTPUT = Path(os.environ.get("SHARDQ_TEST_OUTPUT", Path(__file__).parents[1] / "output")) / "ui"
T = TypeVar("T")


def wait_for(cond: Callable[[], T], what: str, timeout: float = WAIT_S) -> T:
    """Poll `cond` until truthy (browser and HTTP states have no event to await).

    The page swaps its fragment when the data changes, so an element read
    in `cond` may be gone by the time it is used: that counts as not yet.
    """
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
        except StaleElementReferenceException:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class UiCluster:
    """A coordinator with the dashboard's actions on, and brokers b1..b3."""

    def __init__(self, procs: list[Proc], start_broker: Callable[..., Proc], tmp_path: Path,
                 token: str | None, coordinator_args: tuple[str, ...]) -> None:
        self.token = token
        self._start_broker = start_broker
        auth = ("--token", token) if token else ()
        self.coordinator = Proc(["coordinator", "--port", "0", "--data-dir",
                                 str(tmp_path / "coordinator"), "--expect", str(len(BROKERS)),
                                 "--ui-actions", *auth, *coordinator_args],
                                log_path=tmp_path / "coordinator.log")
        procs.append(self.coordinator)
        self.url = f"http://{self.coordinator.addr}"
        self.brokers = {b: self.start_broker(b) for b in BROKERS}
        self.topology = self.synced(BROKERS)

    def start_broker(self, broker_id: str) -> Proc:
        auth = ("--token", self.token) if self.token else ()
        return self._start_broker(broker_id, "--coordinator", self.url, *auth)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def get(self, path: str) -> Any:
        r = httpx.get(self.url + path, headers=self.headers, timeout=10.0)
        r.raise_for_status()
        return r.json()

    def synced(self, brokers: tuple[str, ...]) -> Topology:
        """The topology once every broker in `brokers` owns slots and serves that epoch."""
        def ready() -> Topology | None:
            topo = Topology.from_dict(self.get("/topology"))
            counts = topo.slot_counts()
            if topo.moving or not all(counts.get(b, 0) > 0 for b in brokers):
                return None
            if self.token is None and any(broker_epoch(topo.brokers[b].addr) != topo.epoch
                                          for b in brokers):
                return None
            return topo
        return wait_for(ready, "every broker to own slots")


@pytest.fixture
def ui_cluster(procs: list[Proc], start_broker: Callable[..., Proc],
               tmp_path: Path) -> Callable[..., UiCluster]:
    def start(token: str | None = None, *coordinator_args: str) -> UiCluster:
        return UiCluster(procs, start_broker, tmp_path, token, coordinator_args)
    return start


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (make test installs them as root: "
                    "apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="shardq-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def shot(driver: Any, name: str) -> Path:
    """Save a screenshot of the page as OUTPUT/<name>.png."""
    OUTPUT.mkdir(parents=True, exist_ok=True)
    path = OUTPUT / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


class LoopThread:
    """An asyncio loop running in a daemon thread; `call` runs a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coro: Awaitable[T], timeout: float = WAIT_S) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(timeout):
                return await coro
        future: Future[T] = asyncio.run_coroutine_threadsafe(bounded(), self.loop)
        return future.result(timeout + 5)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture
def aloop() -> Iterator[LoopThread]:
    lt = LoopThread()
    try:
        yield lt
    finally:
        lt.close()
