"""The unit tier starts no process: a test that tries fails at once (its
place is tests/integration)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def no_child_processes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("tests/unit starts no process; this test belongs in "
                             "tests/integration")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    yield
