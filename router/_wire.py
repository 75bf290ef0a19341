"""Parsing the topology shape (docs/design.md §5), as decoded from JSON or msgpack.

Kept apart from topology.py so that the checks live in one place and the
Topology class stays about lookups. Every malformed input raises
ValueError naming the offending field; unknown top-level keys are ignored
so that a newer coordinator can add fields.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, NamedTuple

from .members import BrokerInfo, BrokerState
from .slots import NUM_SLOTS


class TopologyFields(NamedTuple):
    """Topology's constructor arguments, in order."""

    term: int
    epoch: int
    brokers: dict[str, BrokerInfo]
    slot_owners: list[str | None]
    slot_epochs: list[int]
    overrides: dict[str, tuple[str, int]]
    partitions: dict[str, int]
    moving: list[dict[str, Any]]


def parse_topology(d: Mapping[str, Any]) -> TopologyFields:
    """Check and convert a decoded topology.

    Raises:
        ValueError: a required key (epoch, brokers, slots) is missing or
            any field has the wrong type or range.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"topology must be a mapping, got {type(d).__name__}")
    for key in ("epoch", "brokers", "slots"):
        if key not in d:
            raise ValueError(f"topology is missing {key!r}")
    owners, epochs = _slots(d["slots"])
    return TopologyFields(
        term=_int(d.get("term", 0), "term"),
        epoch=_int(d["epoch"], "epoch"),
        brokers=_brokers(d["brokers"]),
        slot_owners=owners,
        slot_epochs=epochs,
        overrides=_overrides(d.get("overrides", {})),
        partitions=_partitions(d.get("partitions", {})),
        moving=_moving(d.get("moving", [])),
    )


def _int(v: Any, what: str, minimum: int = 0) -> int:
    # bool is an int subclass; True as an epoch is a bug, not a 1.
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {v!r}")
    return v


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise ValueError(f"{what} must be a str, got {v!r}")
    return v


def _opt_str(v: Any, what: str) -> str | None:
    return None if v is None else _str(v, what)


def _map(v: Any, what: str) -> Mapping[Any, Any]:
    if not isinstance(v, Mapping):
        raise ValueError(f"{what} must be a mapping, got {type(v).__name__}")
    return v


def _seq(v: Any, what: str) -> list[Any] | tuple[Any, ...]:
    if not isinstance(v, list | tuple):
        raise ValueError(f"{what} must be a list, got {type(v).__name__}")
    return v


def _brokers(v: Any) -> dict[str, BrokerInfo]:
    out: dict[str, BrokerInfo] = {}
    for broker_id, info in _map(v, "brokers").items():
        bid = _str(broker_id, "broker id")
        info = _map(info, f"brokers[{bid!r}]")
        state = _str(info.get("state", BrokerState.ACTIVE.value), f"brokers[{bid!r}].state")
        try:
            parsed_state = BrokerState(state)
        except ValueError:
            known = ", ".join(s.value for s in BrokerState)
            raise ValueError(
                f"brokers[{bid!r}].state {state!r} is not one of {known}"
            ) from None
        out[bid] = BrokerInfo(
            id=bid,
            addr=_str(info.get("addr"), f"brokers[{bid!r}].addr"),
            state=parsed_state,
            weight=_int(info.get("weight", 1), f"brokers[{bid!r}].weight"),
            storage=_opt_str(info.get("storage"), f"brokers[{bid!r}].storage"),
            since=_int(info.get("since", 0), f"brokers[{bid!r}].since"),
        )
    return out


def _slots(v: Any) -> tuple[list[str | None], list[int]]:
    # Brokers and clients parse the whole map at every epoch change (dozens a
    # second during a rebalance): the common, well-formed run is checked with
    # plain type tests, and the messages are built only for a bad one.
    owners: list[str | None] = [None] * NUM_SLOTS
    epochs = [0] * NUM_SLOTS
    for n, run in enumerate(_seq(v, "slots")):
        if type(run) in (list, tuple) and len(run) == 4:
            start, end, owner, epoch = run
            ok = (type(start) is int and type(end) is int and type(owner) is str
                  and type(epoch) is int and 0 <= start <= end < NUM_SLOTS and epoch >= 0)
        else:
            ok = False
        if not ok:  # a precise error, or the values of an unusual but valid run
            start, end, owner, epoch = _checked_run(n, run)
        if owners[start:end + 1].count(None) != end + 1 - start:
            s = next(s for s in range(start, end + 1) if owners[s] is not None)
            raise ValueError(f"slots[{n}]: slot {s} is owned twice ({owners[s]!r}, {owner!r})")
        owners[start:end + 1] = [owner] * (end + 1 - start)
        epochs[start:end + 1] = [epoch] * (end + 1 - start)
    return owners, epochs


def _checked_run(n: int, run: Any) -> tuple[int, int, str, int]:
    """A slot run checked field by field: ValueError naming what is wrong."""
    what = f"slots[{n}]"
    run = _seq(run, what)
    if len(run) != 4:
        raise ValueError(f"{what} must be [start, end, owner, epoch], got {run!r}")
    start, end = _int(run[0], f"{what}.start"), _int(run[1], f"{what}.end")
    owner, epoch = _str(run[2], f"{what}.owner"), _int(run[3], f"{what}.epoch")
    if not start <= end < NUM_SLOTS:
        raise ValueError(f"{what} needs 0 <= start <= end < {NUM_SLOTS}, got {run!r}")
    return int(start), int(end), str(owner), int(epoch)


def _overrides(v: Any) -> dict[str, tuple[str, int]]:
    out: dict[str, tuple[str, int]] = {}
    for queue, entry in _map(v, "overrides").items():
        q = _str(queue, "override queue")
        entry = _seq(entry, f"overrides[{q!r}]")
        if len(entry) != 2:
            raise ValueError(f"overrides[{q!r}] must be [owner, epoch], got {entry!r}")
        out[q] = (
            _str(entry[0], f"overrides[{q!r}].owner"),
            _int(entry[1], f"overrides[{q!r}].epoch"),
        )
    return out


def _partitions(v: Any) -> dict[str, int]:
    return {
        _str(q, "partitioned queue"): _int(p, f"partitions[{q!r}]", minimum=1)
        for q, p in _map(v, "partitions").items()
    }


def _moving(v: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for n, move in enumerate(_seq(v, "moving")):
        out.append(copy.deepcopy(dict(_map(move, f"moving[{n}]"))))
    return out
