"""`cluster up --token`: no token on any command line, a separate control
token for the coordinator and brokers (README "Security")."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import shardq
from tests.aio import run

from ..conftest import Proc
from .test_cluster_up import children

pytestmark = pytest.mark.slow

SECRET = "s3cret-on-no-cmdline"


def test_cluster_up_keeps_tokens_off_command_lines_and_moves_with_the_control_token(
        procs: list[Proc], tmp_path: Path) -> None:
    data = tmp_path / "data"
    sup = Proc(["cluster", "up", "-n", "2", "--data-dir", str(data), "--coordinator-port", "0",
                "--base-port", "0"], env={"SHARDQ_TOKEN": SECRET},
               log_path=tmp_path / "supervisor.log")
    procs.append(sup)
    kids = children(sup.pid)
    assert set(kids) == {"coordinator", "b1", "b2"}
    control = (data / "secrets" / "control.token").read_text().strip()
    for name, pid in kids.items():
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert SECRET.encode() not in argv and control.encode() not in argv, name
        assert b"--token-file" in argv and b"--control-token-file" in argv
    for f in ("client.token", "control.token"):
        assert stat.S_IMODE(os.stat(data / "secrets" / f).st_mode) == 0o600
    assert control != SECRET

    async def main() -> None:
        async with await shardq.connect(sup.addr, SECRET) as client:
            q = client.queue("emails")
            await q.add("n", {}, job_id="j1")
            owner = client._cluster.topology.route("emails")
            assert owner is not None
            other = "b2" if owner[0] == "b1" else "b1"
            # A move is handoff ops over control connections; the admin CLI
            # needs the control token for it (the client token gets 403).
            env = {**os.environ, "SHARDQ_TOKEN": SECRET}
            env.pop("SHARDQ_CONTROL_TOKEN", None)
            move = [sys.executable, "-m", "shardq", "move", "emails", "--to", other,
                    "--coordinator", sup.addr, "--json"]
            refused = subprocess.run(move, env=env, capture_output=True, text=True, timeout=60)
            assert refused.returncode != 0 and "control token" in refused.stdout + refused.stderr
            env["SHARDQ_CONTROL_TOKEN"] = control
            moved = subprocess.run(move, env=env, capture_output=True, text=True, timeout=60)
            assert moved.returncode == 0, moved.stderr
            assert await q.add("n", {}, job_id="j1") == "j1"  # follows the move
            counts = await q.counts()
            assert counts["waiting"] == 1
            await client._topology.refresh()
            assert client._cluster.topology.route("emails")[0] == other  # type: ignore[index]

    run(main())
