"""shardq.codec: the sans-IO frame codec (docs/design.md §1, §4).

Bytes in, frames out: no sockets. Covers round trips, every way a stream can
be cut into reads, the frame-size limit, undecodable frames, and hypothesis
fuzzing of arbitrary bytes in arbitrary chunkings.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shardq.codec import (
    DEFAULT_MAX_FRAME,
    FrameDecoder,
    bad_frame_error,
    encode_body,
    encode_frame,
    is_bad_frame,
)
from shardq.errors import BadRequestError, TooLargeError
from tests.props import examples

FUZZ = settings(max_examples=examples(150), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def header(size: int) -> bytes:
    return struct.pack(">I", size)


def framed(body: bytes) -> bytes:
    """A correctly delimited frame around arbitrary (maybe invalid) body bytes."""
    return header(len(body)) + body


def feed_in_chunks(dec: FrameDecoder, data: bytes, cuts: list[int]) -> list[Any]:
    """Feed `data` cut at the given offsets; return every frame yielded."""
    frames: list[Any] = []
    prev = 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        frames.extend(dec.feed(data[prev:cut]))
        prev = max(prev, cut)
    return frames


# A bad frame: correctly delimited, body is 0xc1 (never used in msgpack).
BAD = framed(b"\xc1")

ROUND_TRIP_VALUES = [
    None,
    True,
    False,
    0,
    1,
    -1,
    127,
    128,
    -33,
    2**31,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    1.5,
    -0.25,
    1e300,
    "",
    "hello",
    "héllo wörld ✓",
    "x" * 70_000,
    b"",
    b"\x00\xff\x01",
    b"\x00" * 70_000,
    [],
    [1, [2, [3, [4]]]],
    {},
    {"a": 1, "b": [True, None]},
    {"nested": {"deeper": {"bytes": b"\x01\x02"}}},
    [7, "ADD", {"queue": "emails", "jobs": [["id-1", "send", b"\x81\xa1k\x01", None]]}],
    [7, "ok", ["id-1", ["BAD_REQUEST", "job data must be msgpack bytes"]], 3],
]


# ---------------------------------------------------------------- encoding
@pytest.mark.parametrize("value", ROUND_TRIP_VALUES, ids=lambda v: repr(v)[:30])
def test_value_round_trips_through_one_frame(value: Any) -> None:
    assert FrameDecoder().feed(encode_frame(value)) == [value]


@pytest.mark.parametrize("value", ROUND_TRIP_VALUES[:12], ids=lambda v: repr(v)[:30])
def test_frame_is_big_endian_length_then_msgpack_body(value: Any) -> None:
    body = msgpack.packb(value, use_bin_type=True)
    frame = encode_frame(value)
    assert frame[:4] == struct.pack(">I", len(body))
    assert frame[4:] == body


def test_encode_body_frames_an_already_packed_body_like_encode_frame() -> None:
    value = [1, "PULL", {"queues": ["a"], "count": 10}]
    assert encode_body(msgpack.packb(value, use_bin_type=True)) == encode_frame(value)


def test_tuples_decode_as_lists() -> None:
    assert FrameDecoder().feed(encode_frame((1, (2, 3)))) == [[1, [2, 3]]]


def test_str_and_bytes_stay_distinct_types() -> None:
    [frame] = FrameDecoder().feed(encode_frame(["ab", b"ab"]))
    assert type(frame[0]) is str
    assert type(frame[1]) is bytes


# ---------------------------------------------------------------- stream handling
def test_one_byte_at_a_time_yields_the_same_frames_as_one_chunk() -> None:
    stream = b"".join(encode_frame(v) for v in ROUND_TRIP_VALUES[:25])
    whole = FrameDecoder().feed(stream)
    dec = FrameDecoder()
    dribbled: list[Any] = []
    for i in range(len(stream)):
        dribbled.extend(dec.feed(stream[i:i + 1]))
    assert dribbled == whole == ROUND_TRIP_VALUES[:25]
    assert dec.buffered == 0


def test_several_frames_in_one_chunk_all_decode_in_order() -> None:
    values = [[i, "PING", {}] for i in range(50)]
    assert FrameDecoder().feed(b"".join(encode_frame(v) for v in values)) == values


@pytest.mark.parametrize("cut", range(0, 12))
def test_frame_split_at_any_offset_decodes_once_complete(cut: int) -> None:
    data = encode_frame("abcdefg")  # 4 + 8 bytes
    dec = FrameDecoder()
    assert dec.feed(data[:cut]) == []
    assert dec.buffered == cut
    assert dec.feed(data[cut:]) == ["abcdefg"]
    assert dec.buffered == 0


def test_partial_frame_after_complete_ones_stays_buffered() -> None:
    second = encode_frame("second")
    dec = FrameDecoder()
    assert dec.feed(encode_frame("first") + second[:5]) == ["first"]
    assert dec.buffered == 5
    assert dec.feed(second[5:]) == ["second"]


def test_feeding_nothing_yields_nothing() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"") == []
    assert dec.buffered == 0


def test_zero_length_header_alone_is_not_yet_a_frame() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"\x00\x00\x00") == []
    assert dec.buffered == 3


# ---------------------------------------------------------------- size limit
def test_default_max_frame_is_16_mib() -> None:
    assert DEFAULT_MAX_FRAME == 16 * 1024 * 1024


def test_frame_of_exactly_max_frame_bytes_is_accepted() -> None:
    value = b"x" * 10
    body = msgpack.packb(value, use_bin_type=True)
    assert FrameDecoder(max_frame=len(body)).feed(encode_frame(value)) == [value]


def test_oversized_length_prefix_raises_too_large_before_the_body_arrives() -> None:
    dec = FrameDecoder(max_frame=100)
    with pytest.raises(TooLargeError) as info:
        dec.feed(header(101))  # only the header: the body is never buffered
    assert "101" in str(info.value)
    assert info.value.code == "TOO_LARGE"
    assert dec.buffered == 0


def test_oversized_length_prefix_raises_even_when_split_bytewise() -> None:
    dec = FrameDecoder(max_frame=1000)
    data = header(2**32 - 1)
    for b in data[:3]:
        assert dec.feed(bytes([b])) == []
    with pytest.raises(TooLargeError):
        dec.feed(data[3:])


def test_oversized_prefix_after_good_frames_in_one_chunk_raises() -> None:
    dec = FrameDecoder(max_frame=64)
    with pytest.raises(TooLargeError):
        dec.feed(encode_frame(1) + header(65) + b"x" * 10)
    assert dec.buffered == 0


def test_too_large_error_is_a_server_error_with_wire_code() -> None:
    dec = FrameDecoder(max_frame=8)
    with pytest.raises(TooLargeError) as info:
        dec.feed(encode_frame("this string is longer than eight"))
    assert info.value.to_body() == str(info.value)


# ---------------------------------------------------------------- undecodable frames
BAD_BODIES = {
    "reserved byte 0xc1": b"\xc1",
    "empty body": b"",
    "truncated array": b"\x92\x01",
    "truncated str": b"\xa5ab",
    "trailing extra value": msgpack.packb(1) + msgpack.packb(2),
    "map with int key": msgpack.packb({1: 2}),
    "invalid utf-8 in str": b"\xa2\xff\xfe",
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_delimited_but_undecodable_frame_yields_bad_frame_marker(body: bytes) -> None:
    [frame] = FrameDecoder().feed(framed(body))
    assert is_bad_frame(frame)
    err = bad_frame_error(frame)
    assert isinstance(err, BadRequestError)
    assert str(err).startswith("undecodable frame: ")
    assert len(str(err)) > len("undecodable frame: ")


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_frames_after_a_bad_frame_still_decode_on_the_next_feed(body: bytes) -> None:
    dec = FrameDecoder()
    assert [is_bad_frame(f) for f in dec.feed(framed(body))] == [True]
    assert dec.buffered == 0
    assert dec.feed(encode_frame([1, "PING", {}])) == [[1, "PING", {}]]


def test_good_frames_before_a_bad_frame_in_one_chunk_are_returned_first() -> None:
    frames = FrameDecoder().feed(encode_frame("a") + encode_frame("b") + BAD)
    assert frames[:2] == ["a", "b"]
    assert is_bad_frame(frames[2])


def test_frames_after_a_bad_frame_in_the_same_chunk_decode_in_that_feed() -> None:
    frames = FrameDecoder().feed(BAD + encode_frame([2, "PING", {}]))
    assert len(frames) == 2
    assert is_bad_frame(frames[0])
    assert frames[1] == [2, "PING", {}]


def test_repeated_bad_frames_do_not_grow_the_buffer() -> None:
    dec = FrameDecoder(max_frame=64)
    chunk = BAD * 2
    for _ in range(100):
        dec.feed(chunk)
        assert dec.buffered < 64 + 4


@pytest.mark.parametrize("value", [None, 0, "", b"", [], {}, "bad"])
def test_ordinary_values_are_not_bad_frames(value: Any) -> None:
    assert not is_bad_frame(value)


# ---------------------------------------------------------------- hypothesis
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=5),
    max_leaves=12,
)
cut_points = st.lists(st.integers(min_value=0, max_value=10_000), max_size=30)


@FUZZ
@given(st.lists(msgpack_values, max_size=12), cut_points)
def test_any_chunking_of_valid_frames_yields_every_value_in_order(values: list[Any],
                                                                  cuts: list[int]) -> None:
    stream = b"".join(encode_frame(v) for v in values)
    dec = FrameDecoder()
    assert feed_in_chunks(dec, stream, cuts) == values
    assert dec.buffered == 0


@FUZZ
@given(st.lists(msgpack_values, max_size=12), cut_points)
def test_valid_stream_never_buffers_more_than_one_partial_frame(values: list[Any],
                                                               cuts: list[int]) -> None:
    stream = b"".join(encode_frame(v) for v in values)
    max_frame = max([len(f) - 4 for f in map(encode_frame, values)] + [1])
    dec = FrameDecoder(max_frame=max_frame)
    prev = 0
    for cut in [*sorted(c % (len(stream) + 1) for c in cuts), len(stream)]:
        dec.feed(stream[prev:cut])
        prev = max(prev, cut)
        assert dec.buffered < max_frame + 4


# Fuzz input: fragments that make the header parser do interesting things
# with a small limit (valid frames, bad frames, zero-length frames, headers
# at and over the limit, raw noise).
SMALL_MAX = 48
fragments = st.one_of(
    st.binary(max_size=24),
    msgpack_values.map(encode_frame),
    st.binary(max_size=12).map(framed),
    st.integers(min_value=0, max_value=2 * SMALL_MAX).map(header),
    st.just(b"\x00\x00\x00\x00"),
)


def feed_fuzz(fragments_: list[bytes], cuts: list[int]) -> list[tuple[int, int]]:
    """Feed the stream; return (chunk length, bytes buffered after) per feed.
    Only TooLargeError may escape; after it the stream is abandoned."""
    stream = b"".join(fragments_)
    dec = FrameDecoder(max_frame=SMALL_MAX)
    seen: list[tuple[int, int]] = []
    prev = 0
    for cut in [*sorted(c % (len(stream) + 1) for c in cuts), len(stream)]:
        chunk = stream[prev:cut]
        prev = max(prev, cut)
        try:
            dec.feed(chunk)
        except TooLargeError:
            assert dec.buffered == 0
            break
        seen.append((len(chunk), dec.buffered))
    return seen


@FUZZ
@given(st.lists(fragments, max_size=20), cut_points)
def test_arbitrary_bytes_in_arbitrary_chunks_raise_nothing_but_too_large(
        frags: list[bytes], cuts: list[int]) -> None:
    feed_fuzz(frags, cuts)


@FUZZ
@given(st.binary(max_size=400), cut_points)
def test_raw_noise_raises_nothing_but_too_large(data: bytes, cuts: list[int]) -> None:
    feed_fuzz([data], cuts)


@FUZZ
@example(frags=[b"\x00\x00\x00\x00"] * 40, cuts=list(range(0, 160, 8)))
@given(st.lists(fragments, max_size=20), cut_points)
def test_fuzzed_stream_never_buffers_more_than_max_frame_plus_chunk(
        frags: list[bytes], cuts: list[int]) -> None:
    for chunk_len, buffered in feed_fuzz(frags, cuts):
        assert buffered <= SMALL_MAX + 4 + chunk_len
        assert buffered < SMALL_MAX + 4
