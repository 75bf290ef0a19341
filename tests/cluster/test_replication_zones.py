"""`--zone` labels with `--replicas 1`: followers in another zone (docs/design.md §12)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import http_get
from tests.cluster.test_replication import Replicated
from tests.conftest import Proc

ZONES = {"b1": "rack-a", "b2": "rack-a", "b3": "rack-b", "b4": "rack-b"}


class Zoned(Replicated):
    def start(self, bid: str, env: dict[str, str] | None = None) -> Proc:
        self.journals[bid] = self.tmp_path / f"acks-{bid}.tsv"
        self.brokers[bid] = self._start_broker(
            bid, "--coordinator", self.url, "--zone", ZONES[bid],
            data_dir=self.data_dir(bid), env={"SHARDQ_LOG_LEVEL": "INFO", **(env or {})})
        return self.brokers[bid]


@pytest.mark.timeout(240)
def test_followers_are_placed_in_another_zone_than_their_primary(
        procs: list[Proc], start_broker: Any, tmp_path: Path) -> None:
    c = Zoned(procs, start_broker, tmp_path, brokers=tuple(ZONES))
    rep = c.replication()
    placed = {p: r["follower"] for p, r in rep.items()}
    assert set(placed) == set(ZONES)
    assert all(ZONES[p] != ZONES[f] for p, f in placed.items()), placed
    status = http_get(c.url, "/status")
    assert {b["id"]: b.get("zone") for b in status["brokers"]} == ZONES
