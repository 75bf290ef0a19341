"""shardq.failpoints: deterministic kill/sleep/error injection (docs/design.md §9)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from shardq import failpoints
from shardq.failpoints import FailpointError


@pytest.fixture(autouse=True)
def no_failpoints() -> Iterator[None]:
    """Failpoints are process-global: every test starts and ends with none."""
    failpoints.configure(None)
    yield
    failpoints.configure(None)


# ======================================================================== configure
@pytest.mark.parametrize(("spec", "expected"), [
    (None, {}),
    ("", {}),
    ("handoff.after_freeze=kill", {"handoff.after_freeze": "kill"}),
    ("commit.before_fsync=sleep(50)", {"commit.before_fsync": "sleep(50)"}),
    ("broker.before_activate=error", {"broker.before_activate": "error"}),
    ("handoff.after_freeze=kill,commit.before_fsync=sleep(50)",
     {"handoff.after_freeze": "kill", "commit.before_fsync": "sleep(50)"}),
    (" a = error , b=sleep(0) ,", {"a": "error", "b": "sleep(0)"}),
    ("a=error,,b=kill", {"a": "error", "b": "kill"}),
    ("a=error,a=sleep(1)", {"a": "sleep(1)"}),
])
def test_configure_parses_the_spec(spec: str | None, expected: dict[str, str]) -> None:
    failpoints.configure(spec)
    assert expected == failpoints.ACTIVE


@pytest.mark.parametrize("spec", [
    "a",
    "a=",
    "a=boom",
    "a=KILL",
    "a=Error",
    "a=sleep",
    "a=sleep()",
    "a=sleep(x)",
    "a=sleep(-5)",
    "a=sleep(1.5)",
    "a=sleep(5)ms",
    "a=kill=error",
    "a=kill;b=error",
    "a=error,b",
    "a=error,b=nope",
])
def test_configure_rejects_a_bad_spec_with_value_error(spec: str) -> None:
    with pytest.raises(ValueError, match="bad failpoint"):
        failpoints.configure(spec)


def test_configure_rejects_an_empty_name() -> None:
    with pytest.raises(ValueError):
        failpoints.configure("=kill")


def test_configure_replaces_the_previous_spec() -> None:
    failpoints.configure("a=error")
    failpoints.configure("b=sleep(1)")
    assert failpoints.ACTIVE == {"b": "sleep(1)"}
    failpoints.configure(None)
    assert failpoints.ACTIVE == {}


# ======================================================================== hit
def test_error_action_raises_failpoint_error_naming_the_point() -> None:
    failpoints.configure("commit.before_fsync=error")
    with pytest.raises(FailpointError, match=r"commit\.before_fsync"):
        failpoints.hit("commit.before_fsync")


def test_failpoint_error_is_a_runtime_error() -> None:
    assert issubclass(FailpointError, RuntimeError)


@pytest.mark.parametrize(("spec", "seconds"), [("sleep(5)", 0.005), ("sleep(0)", 0.0),
                                               ("sleep(1500)", 1.5)])
def test_sleep_action_sleeps_that_many_ms(spec: str, seconds: float,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(failpoints.time, "sleep", slept.append)
    failpoints.configure(f"p={spec}")
    failpoints.hit("p")
    assert slept == [seconds]


def test_sleep_5_really_sleeps() -> None:
    failpoints.configure("p=sleep(5)")
    t0 = time.monotonic()
    failpoints.hit("p")
    assert time.monotonic() - t0 >= 0.004


@pytest.mark.parametrize("spec", [None, "other=error", "commit.before_fsync=error"])
def test_unknown_names_are_no_ops(spec: str | None) -> None:
    failpoints.configure(spec)
    failpoints.hit("commit.after_fsync")
    failpoints.hit("")
