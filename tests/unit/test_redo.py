"""broker/redo.py is the one definition of the redo ops: every emitting site
agrees with it, and every op it defines is emitted, applied and tracked."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from shardq.broker import redo
from shardq.broker.replay import QUEUE_OPS
from shardq.broker.store import Store

from .test_replay import SCENARIOS, replay, restore, single

BROKER_DIR = Path(redo.__file__).resolve().parent
# Sites that pass the code in a variable: (module, the codes that variable takes).
DYNAMIC = {"queue.py": {"W", "S", "D"}}


def emitted_tuples() -> list[tuple[str, int, str, int | None]]:
    """(module, line, code, length or None when starred) of every op literal the
    broker logs: `self._emit((...))`, `<x>.log.append((...))`, `op = (...)`, or
    returned by a function whose name ends in `_op`."""
    found: list[tuple[str, int, str, int | None]] = []
    for path in sorted(BROKER_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            candidates: list[ast.expr] = []
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
                f = node.func
                logs = f.attr == "append" and (
                    (isinstance(f.value, ast.Attribute) and f.value.attr == "log")
                    or (isinstance(f.value, ast.Name) and f.value.id == "log"))
                if f.attr == "_emit" or logs:
                    candidates.append(node.args[0])
            elif (isinstance(node, ast.Assign) and len(node.targets) == 1
                  and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "op"):
                candidates.append(node.value)
            elif isinstance(node, ast.FunctionDef) and node.name.endswith("_op"):
                candidates += [r.value for r in ast.walk(node)
                               if isinstance(r, ast.Return) and r.value is not None]
            for c in candidates:
                if (isinstance(c, ast.Tuple) and c.elts and isinstance(c.elts[0], ast.Constant)
                        and isinstance(c.elts[0].value, str)):
                    starred = any(isinstance(e, ast.Starred) for e in c.elts)
                    found.append((path.name, c.lineno, c.elts[0].value,
                                  None if starred else len(c.elts)))
    return found


def test_every_emitted_op_is_defined_with_its_arity() -> None:
    sites = emitted_tuples()
    assert len(sites) > 30  # the scan sees the emitting sites at all
    for module, line, code, length in sites:
        assert code in redo.OPS, f"{module}:{line} logs op {code!r}, not defined in redo.py"
        if length is not None:
            assert length == redo.arity(code), (
                f"{module}:{line}: op {code!r} has {length} elements, redo.py says "
                f"{redo.arity(code)} ({redo.OPS[code].fields})")


def test_every_defined_op_is_emitted_somewhere() -> None:
    emitted = {code for _, _, code, _ in emitted_tuples()} | set().union(*DYNAMIC.values())
    assert set(redo.OPS) - emitted == set()


def test_replay_applies_every_queue_op_and_the_store_tracks_every_op() -> None:
    assert QUEUE_OPS == redo.QUEUE_CODES
    assert set(redo.DIRTY) == set(redo.OPS)
    assert set(redo.OPS) == redo.QUEUE_CODES | redo.BROKER_CODES


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_ops_a_live_queue_emits_match_the_schema_and_round_trip(scenario: str) -> None:
    q, log = single(dedup_ttl_ms=100)
    q.add("a", "n", b"\x01", {"attempts": 2, "backoff": ["fixed", 50]}, now=0)
    SCENARIOS[scenario](q)
    for op in log:
        assert len(op) == redo.arity(op[0]), op
    restored = restore(replay(log), q.defaults)[q.name]
    assert list(restored.export_chunks()) == list(q.export_chunks())


def test_a_job_op_dirties_its_row_and_a_queue_op_none(tmp_path: Path) -> None:
    st = Store(str(tmp_path / "b.db"))
    st.open_and_recover()
    ops: list[Any] = [("C", "q", "j1", None, 1, 1, 1), ("bR", "q", {"max": 1}),
                      ("M", "q", {"paused": True}), ("T", "q", ["j2", "j3"]),
                      ("O", None, {"slots": []})]
    st.commit(1, ops)
    assert st._dirty == {("q", "j1"), ("q", "j2"), ("q", "j3")}
    with pytest.raises(KeyError):
        st.commit(2, [("ZZ", "q", "x")])  # refused before it is written
    st.close()
    again = Store(str(tmp_path / "b.db"))
    _, _, _, last_seq = again.open_and_recover()
    assert last_seq == 1
    again.close()
