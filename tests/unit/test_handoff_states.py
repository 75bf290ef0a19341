"""The handoff's per-broker move states: the transition table itself."""

from __future__ import annotations

from shardq.broker.handoff import TRANSITIONS, Side


def test_final_states_have_no_way_out() -> None:
    assert TRANSITIONS[Side.COMMITTED] == frozenset()
    assert TRANSITIONS[Side.ABORTED] == frozenset()


def test_every_state_is_listed_and_reaches_a_final_state() -> None:
    assert set(TRANSITIONS) == {None, *Side}
    for start in TRANSITIONS:
        seen, todo = set(), [start]
        while todo:
            now = todo.pop()
            for nxt in TRANSITIONS[now]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert start in (Side.COMMITTED, Side.ABORTED) or {Side.COMMITTED, Side.ABORTED} & seen


def test_only_a_frozen_source_or_an_import_can_commit() -> None:
    committing = {s for s, nxt in TRANSITIONS.items() if Side.COMMITTED in nxt}
    assert committing == {Side.FROZEN, Side.IMPORTING}


def test_a_source_freezes_only_from_its_copy_and_an_unknown_move_never_commits() -> None:
    assert {s for s, nxt in TRANSITIONS.items() if Side.FROZEN in nxt} == {Side.TAPPING,
                                                                          Side.FROZEN}
    assert Side.COMMITTED not in TRANSITIONS[None]
