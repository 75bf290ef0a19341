"""The coordinator's dashboard in a real headless Chromium against a real cluster
(docs/design.md §6, §10; coordinator/ui/dashboard.py).

Each test drives the page as a person would (open a view, press a button,
confirm) and checks the outcome on the cluster itself: through `/topology`
or the Python client, never through the page alone. Every view visited is
saved as a screenshot in the output dir (tests/ui/conftest.py `shot`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

import shardq
from shardq.router import Topology

from .conftest import LoopThread, UiCluster, shot, wait_for

pytestmark = pytest.mark.slow


def css(driver: Any, selector: str) -> list[Any]:
    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def open_view(driver: Any, c: UiCluster, view: str, ready: str) -> None:
    """Open `/ui#view` and wait for the element `ready` of its fragment."""
    driver.get(f"{c.url}/ui#{view}")
    wait_for(lambda: css(driver, ready), f"{ready} on #{view}")


def attrs(driver: Any, selector: str, name: str) -> list[str]:
    """Attribute `name` of every element matching `selector`, read in one script
    (a fragment swap in between cannot leave a stale element)."""
    return list(driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]))"
        ".map(e => e.getAttribute(arguments[1]))", selector, name))


def click(driver: Any, selector: str) -> bool:
    """Click the first element matching `selector` (False: none there yet)."""
    return bool(driver.execute_script(
        "const e = document.querySelector(arguments[0]); if (e) e.click(); return !!e;",
        selector))


def press(driver: Any, selector: str) -> str:
    """Click the action button `selector`, confirm it, and return the result message."""
    old = driver.find_element(By.ID, "toast").text
    wait_for(lambda: click(driver, selector), selector)
    wait_for(lambda: driver.find_element(By.ID, "confirm").get_attribute("open") is not None,
             "the confirmation dialog")
    driver.find_element(By.ID, "confirm-ok").click()
    toast = driver.find_element(By.ID, "toast")
    wait_for(lambda: toast.is_displayed() and toast.text and toast.text != old,
             "the action's result")
    assert "ok" in (toast.get_attribute("class") or ""), toast.text
    return str(toast.text)


def test_cluster_view_lists_every_broker_with_its_slots_from_topology(
        ui_cluster: Any, browser: Any) -> None:
    c = ui_cluster()
    counts = Topology.from_dict(c.get("/topology")).slot_counts()
    open_view(browser, c, "cluster", "#brokers tr.broker")
    # One script reads the whole fragment, so a refresh in between cannot split the reading.
    rows, drawn = browser.execute_script("""
        const rows = {};
        for (const tr of document.querySelectorAll('#brokers tr.broker'))
          rows[tr.dataset.broker] = [tr.dataset.slots, tr.querySelector('td.slots').textContent];
        const drawn = {};
        for (const p of document.querySelectorAll('svg.slots path.owner'))
          drawn[p.getAttribute('data-owner')] = Number(p.getAttribute('data-slots'));
        return [rows, drawn];""")
    assert sorted(rows) == ["b1", "b2", "b3"]
    for bid, (slots, text) in rows.items():
        assert int(slots) == counts[bid] and text == f"{counts[bid]:,}"
    # The slot picture draws every slot once, in its owner's colour.
    assert drawn == counts and sum(drawn.values()) == 4096
    shot(browser, "cluster")


async def _fail_then_succeed(url: str, token: str | None, queue: str,
                             calls: list[str]) -> tuple[shardq.Client, shardq.Worker, Any]:
    client = await shardq.connect(url, token=token)

    async def handle(job: shardq.Job) -> dict[str, Any]:
        calls.append(job.id)
        if len(calls) == 1:
            raise RuntimeError("downstream said no (first try)")
        return {"ok": True}

    worker = client.worker(queue, handle, concurrency=2)
    task = asyncio.get_running_loop().create_task(worker.run())
    return client, worker, task


async def _stop(client: shardq.Client, worker: shardq.Worker, task: Any) -> None:
    await worker.close()
    await task
    await client.aclose()


async def _job(client: shardq.Client, queue: str, job_id: str) -> dict[str, Any] | None:
    return await client.queue(queue).get_job(job_id)


def test_failed_job_shows_its_reason_and_retry_runs_it_to_completion(
        ui_cluster: Any, browser: Any, aloop: LoopThread) -> None:
    c = ui_cluster()
    queue, calls = "ui-fails", []
    client, worker, task = aloop.call(_fail_then_succeed(c.url, None, queue, calls))
    try:
        job_id = aloop.call(client.queue(queue).add("charge", {"amount": 42}, attempts=1))
        wait_for(lambda: (aloop.call(_job(client, queue, job_id)) or {}).get("state") == "failed",
                 "the job to fail")
        open_view(browser, c, f"jobs?queue={queue}&state=failed", f'tr.job[data-job="{job_id}"]')
        wait_for(lambda: "downstream said no" in
                 css(browser, f'tr.job[data-job="{job_id}"] td.reason')[0].text,
                 "the failed reason in the job's row")
        shot(browser, "jobs-failed")
        # The job view shows the handler's traceback, sent by the worker with FAIL.
        open_view(browser, c, f"job?queue={queue}&id={job_id}", "#job-view pre.stacktrace")
        trace = css(browser, '#job-view pre.stacktrace[data-attempt="last"]')[0].text
        assert trace.startswith("Traceback (most recent call last):"), trace
        assert "in handle" in trace and "RuntimeError: downstream said no (first try)" in trace
        shot(browser, "job-failed")
        open_view(browser, c, f"jobs?queue={queue}&state=failed", f'tr.job[data-job="{job_id}"]')

        message = press(browser, f'tr.job[data-job="{job_id}"] button[data-action="retry_job"]')
        assert job_id in message
        done = wait_for(lambda: (aloop.call(_job(client, queue, job_id)) or {}).get("state")
                        == "completed", "the retried job to complete")
        assert done and len(calls) == 2
        open_view(browser, c, f"job?queue={queue}&id={job_id}",
                  '#job-view[data-state="completed"]')
        wait_for(lambda: '"ok": true' in browser.find_element(By.ID, "job-view").text,
                 "the job's result")
        shot(browser, "job")
    finally:
        aloop.call(_stop(client, worker, task))


def test_pausing_a_queue_in_the_page_stops_its_worker_getting_jobs(
        ui_cluster: Any, browser: Any, aloop: LoopThread) -> None:
    c = ui_cluster()
    queue, handled = "ui-pause", []

    async def start() -> tuple[shardq.Client, shardq.Worker, Any]:
        client = await shardq.connect(c.url)

        async def handle(job: shardq.Job) -> None:
            handled.append(job.id)

        worker = client.worker(queue, handle, concurrency=4)
        return client, worker, asyncio.get_running_loop().create_task(worker.run())

    client, worker, task = aloop.call(start())
    q = client.queue(queue)
    try:
        aloop.call(q.add_bulk([("before", i) for i in range(5)]))
        wait_for(lambda: len(handled) == 5, "the worker to run the first jobs")
        # Other queues too, so the search has something to leave out.
        aloop.call(client.queue("ui-other").add_bulk([("x", i) for i in range(3)]))

        open_view(browser, c, "queues", "#queues-view")
        search = browser.find_element(By.ID, "queue-search")
        search.send_keys(queue)
        row_css = f'tr.queue[data-queue="{queue}"]'
        wait_for(lambda: attrs(browser, "tr.queue", "data-queue") == [queue],
                 "the search to show only the paused queue's row")
        press(browser, f'{row_css} button[data-action="pause"]')
        wait_for(lambda: css(browser, f'{row_css}[data-paused="true"]'), "the row to say paused")
        assert aloop.call(q.counts())["paused"] is True
        shot(browser, "queues")

        aloop.call(q.add_bulk([("after", i) for i in range(20)]))
        # Nothing to await for a job not handed out: watch for a bounded while.
        with pytest.raises(AssertionError):
            wait_for(lambda: len(handled) > 5, "a job of the paused queue", timeout=3.0)
        assert aloop.call(q.counts())["waiting"] == 20

        press(browser, f'{row_css} button[data-action="resume"]')
        wait_for(lambda: len(handled) == 25, "the worker to get the jobs after resume")
        open_view(browser, c, f"queue?queue={queue}", '#queue-view[data-paused="false"]')
        shot(browser, "queue")
    finally:
        aloop.call(_stop(client, worker, task))


def test_a_running_scale_out_shows_its_moves_in_the_slot_picture(
        ui_cluster: Any, browser: Any, aloop: LoopThread) -> None:
    # Paced copies make each handoff last long enough to be seen (about 2 s each).
    c = ui_cluster(None, "--handoff-copy-rate", "100")

    async def push() -> None:
        async with await shardq.connect(c.url) as client:
            await asyncio.gather(*(client.queue(f"ui-load-{i}").add_bulk(
                [("x", k) for k in range(30)]) for i in range(400)))

    aloop.call(push(), timeout=120)
    open_view(browser, c, "cluster", "#brokers tr.broker")
    c.start_broker("b4")
    moving = wait_for(lambda: attrs(browser, 'svg.slots path.moving[data-to="b4"]', "data-slots"),
                      "a move onto b4 in the slot picture", timeout=60)
    assert int(moving[0]) > 0
    assert attrs(browser, "#moves tr.move", "data-move")
    shot(browser, "scale-out")

    topo = c.synced(("b1", "b2", "b3", "b4"))
    b4 = topo.slot_counts()["b4"]
    wait_for(lambda: css(browser, f'tr.broker[data-broker="b4"][data-slots="{b4}"]')
             and not css(browser, "svg.slots path.moving"), "the page to show the new map")


def test_without_the_token_the_page_shows_nothing_and_every_api_call_gets_401(
        ui_cluster: Any, browser: Any, aloop: LoopThread) -> None:
    token = "s3cret-dashboard-token"
    c = ui_cluster(token)

    async def add() -> None:
        async with await shardq.connect(c.url, token=token) as client:
            await client.queue("ui-secret").add("x", 1)

    aloop.call(add())
    calls = [("GET", "/ui/api/cluster"), ("GET", "/ui/api/queues?q=x"),
             ("GET", "/ui/api/queue?queue=x"), ("GET", "/ui/api/jobs?queue=x&state=failed"),
             ("GET", "/ui/api/job?queue=x&id=y"), ("POST", "/ui/api/action"),
             ("GET", "/topology"), ("GET", "/stats")]
    for method, path in calls:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.request(method, c.url + path, headers=headers, json={"action": "rebalance"})
            assert r.status_code == 401, (method, path, headers, r.text)
    shell = httpx.get(c.url + "/ui")
    assert shell.status_code == 200 and "b1" not in shell.text

    browser.get(f"{c.url}/ui#cluster")
    login = browser.find_element(By.ID, "login")
    wait_for(login.is_displayed, "the token prompt")
    assert not browser.find_element(By.ID, "app").is_displayed()
    assert browser.find_element(By.ID, "view").get_attribute("innerHTML") == ""
    shot(browser, "login")

    field = browser.find_element(By.ID, "token")
    field.send_keys("wrong", Keys.ENTER)
    wait_for(lambda: "wrong token" in browser.find_element(By.ID, "login-error").text,
             "the page to refuse a wrong token")
    field.send_keys(token, Keys.ENTER)
    wait_for(lambda: len(css(browser, "#brokers tr.broker")) == 3, "the cluster view")
    # The coordinator reads the brokers with the same token (paused flags come from them).
    browser.get(f"{c.url}/ui#queues")
    wait_for(lambda: css(browser, 'tr.queue[data-queue="ui-secret"][data-paused="false"]'),
             "the queue's row with its paused flag read from its broker")
    assert token not in browser.current_url
    assert browser.execute_script("return sessionStorage.getItem('shardq-token')") == token
    assert token not in (c.coordinator.log_path.read_text() if c.coordinator.log_path else "")
