"""Follower placement across `--zone` labels (docs/design.md §12): pure, no sockets."""

from __future__ import annotations

from pathlib import Path

from shardq.coordinator import Membership, Store
from shardq.coordinator.replication import ReplicationBook
from tests.unit.test_coordinator_replication import TIMEOUT, Clock


def zoned(tmp_path: Path, zones: dict[str, str | None]) -> tuple[Membership, ReplicationBook,
                                                                    Store, Clock]:
    clock = Clock()
    store = Store(tmp_path / "coordinator.db")
    m = Membership(store, expect=len(zones), heartbeat_timeout_ms=TIMEOUT, clock=clock,
                   wall=lambda: 42)
    book = ReplicationBook(m, store, 1)
    for i, (bid, zone) in enumerate(zones.items(), start=1):
        book.note_zone(bid, zone)  # as the register handler does, before registering
        m.register(bid, f"127.0.0.1:{7100 + i}", 1)
    return m, book, store, clock


def followers(book: ReplicationBook) -> dict[str, str]:
    return {p: r["follower"] for p, r in book.state.items()}


def test_followers_are_placed_in_another_zone(tmp_path: Path) -> None:
    zones = {"b1": "a", "b2": "a", "b3": "b", "b4": "b"}
    _, book, store, _ = zoned(tmp_path, zones)
    assert book.reconcile()
    placed = followers(book)
    # Without zones it would be b1->b2 and b3->b4, each within its zone.
    assert placed == {"b1": "b3", "b2": "b4", "b3": "b1", "b4": "b2"}
    assert all(zones[p] != zones[f] for p, f in placed.items())
    store.close()


def test_one_zone_or_none_falls_back_to_the_ring(tmp_path: Path) -> None:
    _, book, store, _ = zoned(tmp_path, {"b1": "a", "b2": "a", "b3": None})
    book.reconcile()
    # b3 has no label, so it is in another zone than b1's and b2's: both get
    # it (the zone comes before the load); b3 itself has no zone to avoid.
    placed = followers(book)
    assert placed["b1"] == "b3" and placed["b2"] == "b3" and placed["b3"] == "b1"
    store.close()


def test_a_replacement_follower_is_taken_from_another_zone(tmp_path: Path) -> None:
    zones = {"b1": "a", "b2": "b", "b3": "a", "b4": "b"}
    m, book, store, clock = zoned(tmp_path, zones)
    book.reconcile()
    assert followers(book)["b1"] == "b2"
    clock.now += TIMEOUT + 1
    for b in ("b1", "b3", "b4"):
        m.heartbeat(b)
    assert m.check_liveness() == ["b2"]
    book.reconcile()
    assert book.state["b1"]["follower"] == "b4", "the live broker of the other zone"
    store.close()


def test_a_zone_label_is_kept_from_register_or_heartbeat_and_none_changes_nothing(
        tmp_path: Path) -> None:
    _, book, store, _ = zoned(tmp_path, {"b1": "a", "b2": None})
    book.note_zone("b2", "b")
    book.note_zone("b1", None)  # a heartbeat without a zone keeps the label known
    assert book.zones == {"b1": "a", "b2": "b"}
    store.close()


def test_a_bad_zone_label_is_refused_by_the_broker_command() -> None:
    import pytest
    import typer

    from shardq.cli.broker_cmd import _zone

    assert _zone("eu-west-1a") == "eu-west-1a"
    assert _zone("") is None and _zone(None) is None
    for bad in ("rack a", "x" * 65, "a\x00"):
        with pytest.raises(typer.BadParameter, match="--zone"):
            _zone(bad)
