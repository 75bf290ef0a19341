"""`shardq scale out|in --coordinator URL` without --data-dir, from another
directory: `cluster up` registered its data dir for that URL. Without a
supervisor (brokers started apart, as on Kubernetes) `scale in` drains,
says what to stop and returns; `--wait` then removes the stopped broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ..conftest import Proc
from .conftest import SplitCluster, http_get

pytestmark = pytest.mark.slow


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SHARDQ_DATA_DIR"}
    return subprocess.run([sys.executable, "-m", "shardq", *args], capture_output=True,
                          text=True, timeout=180, check=False, cwd=cwd, env=env)


def brokers(url: str) -> dict[str, Any]:
    return {b["id"]: b for b in (http_get(url, "/status") or {"brokers": []})["brokers"]}


def test_scale_out_and_in_find_the_local_cluster_by_its_coordinator(
        procs: list[Proc], tmp_path: Path) -> None:
    up = Proc(["cluster", "up", "-n", "2", "--data-dir", str(tmp_path / "data"),
               "--coordinator-port", "0", "--base-port", "0"],
              log_path=tmp_path / "supervisor.log")
    procs.append(up)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()  # no shardq-data here
    url = up.addr.replace("127.0.0.1", "localhost")  # the same coordinator, spelled otherwise

    r = cli(elsewhere, "scale", "out", "-n", "1", "--coordinator", url, "--json")
    assert r.returncode == 0, r.stderr
    assert [b["id"] for b in json.loads(r.stdout)["brokers"]] == ["b3"]
    assert brokers(up.addr)["b3"]["state"] == "active"

    r = cli(elsewhere, "scale", "in", "--broker", "b3", "--coordinator", url, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["exit_code"] == 0  # the supervisor stopped it
    assert "b3" not in brokers(up.addr)

    r = cli(elsewhere, "scale", "out", "--coordinator", "http://127.0.0.1:1")
    assert r.returncode == 1 and "no local cluster" in r.stderr, r.stderr


def test_scale_in_without_a_supervisor_says_what_to_do_then_waits_with_wait(
        split_cluster: SplitCluster, tmp_path: Path) -> None:
    c = split_cluster
    r = cli(tmp_path, "scale", "in", "--broker", "b3", "--coordinator", c.url)
    assert r.returncode == 0, r.stderr
    assert "stop its process" in r.stderr and "--wait" in r.stderr, r.stderr
    assert brokers(c.url)["b3"]["slots"] == 0  # drained, still listed
    assert c.brokers["b3"].terminate() is not None
    r = cli(tmp_path, "scale", "in", "--broker", "b3", "--coordinator", c.url, "--wait")
    assert r.returncode == 0, r.stderr
    assert "b3" not in brokers(c.url)
