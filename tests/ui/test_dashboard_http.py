"""The dashboard's HTTP surface without a browser: read-only unless `--ui-actions`,
typed refusals, the page's security headers (coordinator/ui/dashboard.py)."""

from __future__ import annotations

import http.client
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ..conftest import Proc


def coordinator(procs: list[Proc], tmp_path: Path, *extra: str) -> str:
    p = Proc(["coordinator", "--port", "0", "--data-dir", str(tmp_path / f"c{len(procs)}"),
              *extra], log_path=tmp_path / f"coordinator-{len(procs)}.log")
    procs.append(p)
    return f"http://{p.addr}"


def test_without_ui_actions_the_dashboard_is_read_only(procs: list[Proc],
                                                       tmp_path: Path) -> None:
    url = coordinator(procs, tmp_path)
    r = httpx.post(url + "/ui/api/action", json={"action": "rebalance"})
    assert r.status_code == 403 and "--ui-actions" in r.json()["error"]
    page = httpx.get(url + "/ui/api/cluster")
    assert page.status_code == 200 and "read-only" in page.text and "data-action" not in page.text


def test_actions_take_json_only_and_bad_input_gets_a_clear_refusal(procs: list[Proc],
                                                                   tmp_path: Path) -> None:
    url = coordinator(procs, tmp_path, "--ui-actions")
    form = httpx.post(url + "/ui/api/action", data={"action": "rebalance"})
    assert form.status_code == 400 and "application/json" in form.json()["error"]
    unknown = httpx.post(url + "/ui/api/action", json={"action": "obliterate_everything"})
    assert unknown.status_code == 400 and "unknown action" in unknown.json()["error"]
    bad_state = httpx.get(url + "/ui/api/jobs", params={"queue": "q", "state": "bogus"})
    assert bad_state.status_code == 400 and "state must be" in bad_state.text
    no_queue = httpx.get(url + "/ui/api/job")
    assert no_queue.status_code == 400 and "queue" in no_queue.text
    bad_page = httpx.get(url + "/ui/api/queues", params={"page": "-1"})
    assert bad_page.status_code == 400


def test_the_page_shell_runs_only_its_own_scripts(procs: list[Proc], tmp_path: Path) -> None:
    url = coordinator(procs, tmp_path)
    shell = httpx.get(url + "/ui")
    csp = shell.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert httpx.get(url + "/ui/static/app.js").status_code == 200
    assert httpx.get(url + "/ui/static/nope.js").status_code == 404


@pytest.mark.slow
def test_the_dashboard_bench_runs_and_times_every_request() -> None:
    bench = Path(__file__).parents[2] / "bench" / "bench_dashboard.py"
    r = subprocess.run([sys.executable, str(bench), "--queues", "30", "--jobs", "300",
                        "--requests", "2", "--no-browser"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for what in ("healthz", "cluster (fresh)", "queues by depth (cached)", "job detail"):
        assert what in r.stdout, r.stdout


def test_dot_segments_under_the_public_static_path_reach_no_data(procs: list[Proc],
                                                                   tmp_path: Path) -> None:
    url = coordinator(procs, tmp_path, "--token", "t0ken")
    host, port = url.removeprefix("http://").rsplit(":", 1)
    for path in ("/ui/static/../api/cluster", "/ui/static/..%2fapi/cluster",
                 "/ui/static/../../topology", "/ui/static/%2e%2e/%2e%2e/topology"):
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", path)  # sent as is: httpx would normalise the dots away
        status = conn.getresponse().status
        conn.close()
        assert status == 404, path
    assert httpx.get(url + "/ui/api/cluster").status_code == 401
