"""docs/protocol-vectors.json against the Python encoder, decoder and hash."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shardq.codec import FrameDecoder, encode_frame
from shardq.router import Ring, hash64, partition_for, slot_of
from tests import protocol_vectors as pv

VECTORS: dict[str, Any] = json.loads(pv.PATH.read_text(encoding="utf-8"))


def test_vectors_file_is_what_the_definitions_generate() -> None:
    assert pv.PATH.read_text(encoding="utf-8") == pv.render(), \
        "run: python -m tests.protocol_vectors --write"


def test_every_client_op_of_the_spec_has_a_request_vector() -> None:
    ops = {r["op"] for r in VECTORS["requests"]}
    spec = (pv.PATH.parent / "protocol.md").read_text(encoding="utf-8")
    for op in ("HELLO", "PING", "ADD", "PULL", "ACK", "FAIL", "EXTEND", "PROGRESS", "COUNTS",
               "GET_JOB", "PAUSE", "RESUME", "DRAIN", "OBLITERATE", "QUEUES", "STATS", "TOPOLOGY",
               "SCHED_UPSERT", "SCHED_REMOVE", "SCHED_LIST", "RATE_LIMIT", "GROUP_SET", "LIMITS",
               "LOG", "GET_LOGS", "DLQ_LIST", "DLQ_RETRY", "DLQ_PURGE", "SUBSCRIBE",
               "FLOW_ADD_CHILDREN", "FLOW_ADD_PARENT", "FLOW_COMMIT", "FLOW_CHILDREN"):
        assert op in ops, op
        assert f"`{op}`" in spec, f"docs/protocol.md does not describe {op}"


@pytest.mark.parametrize("vec", VECTORS["requests"], ids=lambda v: f"{v['req_id']}-{v['op']}")
def test_request_frame_encodes_to_the_golden_hex(vec: dict[str, Any]) -> None:
    frame = [vec["req_id"], vec["op"], pv.from_json(vec["args"])]
    assert encode_frame(frame).hex() == vec["hex"]
    assert FrameDecoder().feed(bytes.fromhex(vec["hex"])) == [frame]


@pytest.mark.parametrize("vec", VECTORS["replies"], ids=lambda v: v["what"])
def test_reply_frame_decodes_to_its_value(vec: dict[str, Any]) -> None:
    data = bytes.fromhex(vec["hex"])
    # One byte at a time: framing must not depend on how reads split the stream.
    dec = FrameDecoder()
    frames = [f for i in range(len(data)) for f in dec.feed(data[i:i + 1])]
    assert frames == [pv.from_json(vec["value"])]


@pytest.mark.parametrize("vec", VECTORS["hashes"], ids=lambda v: repr(v["name"]))
def test_hash_and_slot_of_each_name(vec: dict[str, Any]) -> None:
    assert hash64(vec["name"]) == pv.from_json(vec["hash64"])
    assert slot_of(vec["name"]) == vec["slot"]


def test_partitions_and_ring_targets() -> None:
    for p in VECTORS["partitions"]:
        assert partition_for(p["key"], p["p"]) == p["partition"]
    ring = Ring(VECTORS["ring"]["brokers"], VECTORS["ring"]["vnodes"])
    for t in VECTORS["ring"]["targets"]:
        assert ring.target(t["slot"]) == t["broker"]
