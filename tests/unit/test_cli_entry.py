"""shardq.cli: a server process imports only its own command's module."""

from __future__ import annotations

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
