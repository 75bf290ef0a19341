"""shardq.cli: a server process imports only its own command's module."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shardq.cli import _server_command_module


@pytest.mark.parametrize(("argv", "expected"), [
    (["/venv/bin/shardq", "broker", "--id", "b1"], "broker_cmd"),
    (["/src/shardq/__main__.py", "coordinator", "--port", "0"], "coordinator_cmd"),
    (["/venv/bin/shardq", "status"], None),  # not a server: every command
    (["/venv/bin/shardq"], None),
    (["/venv/lib/pytest/__main__.py", "broker"], None),  # another program's argv
    (["/venv/bin/other", "broker"], None),
])
def test_only_a_server_started_as_shardq_imports_just_its_command(
        argv: list[str], expected: str | None) -> None:
    assert _server_command_module(argv) == expected


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
        p.wait(timeout=10)
