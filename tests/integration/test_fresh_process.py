"""What needs a fresh Python process: the CLI's lazy imports, the `kill`
failpoint, and ring targets that must not depend on the hash seed (tests/unit
starts no process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from shardq.router import Ring

BROKERS_10 = {f"b{i}": 1 for i in range(1, 11)}


def test_a_broker_process_skips_the_rest_of_the_cli_and_other_commands_still_work() -> None:
    code = ("import sys, pathlib; sys.argv = [str(pathlib.Path('shardq') / '__main__.py'), "
            "'broker', '--help']\n"
            "import shardq.cli as c\n"
            "print(sorted(m for m in sys.modules if m.startswith('shardq.cli.')))\n"
            "print(sorted(cmd.name for cmd in c.app.registered_commands))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.splitlines()
    assert out == ["['shardq.cli.broker_cmd']", "['broker']"]
    full = subprocess.run([sys.executable, "-m", "shardq", "--help"], capture_output=True,
                          text=True, timeout=60, check=True).stdout
    for command in ("broker", "coordinator", "status", "drain", "stats", "bench", "deploy"):
        assert command in full


def test_kill_action_sigkills_the_process() -> None:
    code = ("from shardq import failpoints\n"
            "failpoints.configure('handoff.after_freeze=kill')\n"
            "failpoints.hit('other')\n"
            "print('before', flush=True)\n"
            "failpoints.hit('handoff.after_freeze')\n"
            "print('after', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert proc.stdout == "before\n"
    assert "failpoint handoff.after_freeze: kill" in proc.stderr


def test_ring_is_the_same_in_another_process() -> None:
    code = (
        "import json; from shardq.router import Ring; "
        f"print(json.dumps(Ring({BROKERS_10!r}).targets()))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == Ring(BROKERS_10).targets()


def test_broker_with_no_options_is_b1_on_7101_in_shardq_data(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal
    import socket

    with socket.socket() as s:  # the default port is shared with whatever else runs here
        if s.connect_ex(("127.0.0.1", 7101)) == 0:
            pytest.skip("port 7101 is in use on this machine")
    p = subprocess.Popen([sys.executable, "-m", "shardq", "broker"], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert p.stdout is not None
        line = p.stdout.readline().decode().strip()
        assert line == "READY 127.0.0.1:7101", (line, p.stderr.read() if p.poll() else b"")
        assert (tmp_path / "shardq-data" / "broker.db").exists()
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate(timeout=10)  # reaps it and closes both pipes
