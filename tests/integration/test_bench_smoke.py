"""`shardq bench` runs end to end on a tiny workload (no peers, loopback only).

The broadcast scenario with 300 messages on 2 brokers (+1 scaled out mid-burst and back in)
must account every (message, stage) execution exactly once; the account itself must catch
a lost and a duplicated stage execution.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import bench_scenario  # noqa: E402


def _shardq(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardq", *args], cwd=ROOT, timeout=timeout,
                          capture_output=True, text=True)


def test_scenario_account_flags_lost_and_duplicated_stage_executions() -> None:
    acct = bench_scenario.Account(3)
    for m in range(3):
        for stage in range(6):
            if (m, stage) != (1, 4):  # message 1 never ran "save"
                acct.record(m, stage, 0.0, 0.001)
    acct.record(2, 2, 0.0, 0.001)  # message 2 ran "ai" twice
    v = acct.verdict()
    assert (v["lost"], v["duplicated"], v["exactly_once"]) == (1, 1, False)
    assert v["per_stage_account"]["save"] == {"lost": 1, "duplicated": 0}
    assert v["per_stage_account"]["ai"] == {"lost": 0, "duplicated": 1}
    assert acct.finished == 3


def test_bench_scenario_runs_every_stage_exactly_once_across_scale_out_and_in(
        tmp_path: Path) -> None:
    out = tmp_path / "scenario.jsonl"
    r = _shardq("bench", "scenario", "-n", "300", "--brokers", "2", "--tenants", "5",
                "--burst-seconds", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text().splitlines()[-1])
    assert report["exactly_once"] is True
    assert (report["lost"], report["duplicated"]) == (0, 0)
    assert report["completed_all_stages"] == 300
    assert report["stage_executions"] == 300 * 6
    done = {e["event"]: e.get("code") for e in report["events"] if e["event"].endswith("done")}
    assert done == {"scale out done": 0, "scale in b3 done": 0}
    assert report["left_in_queues"]["waiting"] == 0


def test_bench_push_writes_a_result_line(tmp_path: Path) -> None:
    out = tmp_path / "peers.jsonl"
    r = _shardq("bench", "push", "--mode", "bulk", "--jobs", "300", "--seconds", "5",
                "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    push = [x for x in rows if x["bench"] == "peers"]
    assert len(push) == 1
    assert push[0]["system"] == "shardq-durable" and push[0]["workload"] == "add_bulk"
    assert push[0]["ops"] == 300 and push[0]["rate"] > 0
