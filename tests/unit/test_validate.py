"""shardq.broker.validate: bad request arguments become a BadRequestError
that names what is wrong, before any state changes (docs/design.md §9.7)."""

from __future__ import annotations

from typing import Any

import pytest

from shardq.broker import validate
from shardq.errors import BadRequestError, TooLargeError
from shardq.protocol import QUEUE_NAME_MAX

MAX_DATA = 1024


# ======================================================================== job options
@pytest.mark.parametrize(("opts", "field"), [
    ({"priority": -1}, "priority"),
    ({"priority": 1.5}, "priority"),
    ({"priority": "1"}, "priority"),
    ({"priority": True}, "priority"),
    ({"priority": None}, "priority"),
    ({"delay_ms": -5}, "delay_ms"),
    ({"delay_ms": 2.0}, "delay_ms"),
    ({"delay_ms": False}, "delay_ms"),
    ({"attempts": 0}, "attempts"),
    ({"attempts": -1}, "attempts"),
    ({"attempts": "3"}, "attempts"),
    ({"attempts": True}, "attempts"),
    ({"backoff": {"type": "linear", "delay_ms": 10}}, "backoff"),
    ({"backoff": {"delay_ms": 10}}, "backoff"),
    ({"backoff": {"type": "fixed", "delay_ms": -1}}, "backoff.delay_ms"),
    ({"backoff": {"type": "exponential", "delay_ms": "10"}}, "backoff.delay_ms"),
    ({"backoff": {"type": "fixed", "delay_ms": True}}, "backoff.delay_ms"),
    ({"backoff": -10}, "backoff"),
    ({"backoff": "fixed"}, "backoff"),
    ({"backoff": [10]}, "backoff"),
    ({"backoff": False}, "backoff"),
    ({"remove_on_complete": -1}, "remove_on_complete"),
    ({"remove_on_complete": "yes"}, "remove_on_complete"),
    ({"remove_on_complete": 1.5}, "remove_on_complete"),
    ({"remove_on_fail": -2}, "remove_on_fail"),
    ({"remove_on_fail": [1]}, "remove_on_fail"),
    ({"timestamp": -1}, "timestamp"),
    ({"timestamp": "now"}, "timestamp"),
    ({"job_id": "x"}, "job_id"),
    ({"lifo": True}, "lifo"),
    ({"priority": 1, "zzz": 1, "aaa": 2}, "aaa, zzz"),
])
def test_bad_job_option_is_a_bad_request_naming_the_field(opts: dict[str, Any],
                                                           field: str) -> None:
    with pytest.raises(BadRequestError, match=field.replace(".", r"\.")) as info:
        validate.job_opts(opts)
    assert info.value.code == "BAD_REQUEST"


@pytest.mark.parametrize("opts", [[], "priority=1", 3, b"\x80", True])
def test_job_opts_that_are_not_a_map_are_refused(opts: Any) -> None:
    with pytest.raises(BadRequestError, match="opts"):
        validate.job_opts(opts)


def test_unknown_option_message_lists_every_unknown_key_sorted() -> None:
    with pytest.raises(BadRequestError) as info:
        validate.job_opts({"b": 1, "a": 2, "priority": 0})
    assert str(info.value) == "unknown job option(s): a, b"


@pytest.mark.parametrize(("opts", "expected"), [
    (None, None),
    ({}, {}),
    ({"priority": 0}, {"priority": 0}),
    ({"priority": 7, "delay_ms": 0, "attempts": 1}, {"priority": 7, "delay_ms": 0,
                                                    "attempts": 1}),
    ({"attempts": 5}, {"attempts": 5}),
    ({"backoff": None}, {}),
    ({"backoff": 250}, {"backoff": ["fixed", 250]}),
    ({"backoff": 0}, {"backoff": ["fixed", 0]}),
    ({"backoff": {"type": "fixed", "delay_ms": 100}}, {"backoff": ["fixed", 100]}),
    ({"backoff": {"type": "exponential", "delay_ms": 5}}, {"backoff": ["exponential", 5]}),
    ({"backoff": {"type": "exponential"}}, {"backoff": ["exponential", 0]}),
    ({"remove_on_complete": True}, {"remove_on_complete": 0}),
    ({"remove_on_complete": False}, {"remove_on_complete": -1}),
    ({"remove_on_complete": None}, {"remove_on_complete": -1}),
    ({"remove_on_complete": 0}, {"remove_on_complete": 0}),
    ({"remove_on_complete": 100}, {"remove_on_complete": 100}),
    ({"remove_on_fail": True}, {"remove_on_fail": 0}),
    ({"remove_on_fail": 3}, {"remove_on_fail": 3}),
    ({"timestamp": 1_700_000_000_000}, {"timestamp": 1_700_000_000_000}),
])
def test_good_job_options_are_normalised(opts: Any, expected: Any) -> None:
    assert validate.job_opts(opts) == expected


def test_job_opts_does_not_modify_its_input() -> None:
    opts = {"backoff": {"type": "fixed", "delay_ms": 3}, "remove_on_complete": True}
    validate.job_opts(opts)
    assert opts == {"backoff": {"type": "fixed", "delay_ms": 3}, "remove_on_complete": True}


# ======================================================================== job items
@pytest.mark.parametrize(("item", "field"), [
    ("not a list", "job"),
    ({"id": "a"}, "job"),
    (["a", "n", b""], "job"),
    (["a", "n", b"", None, None], "job"),
    (["", "n", b"", None], "job id"),
    ([None, "n", b"", None], "job id"),
    ([17, "n", b"", None], "job id"),
    (["x" * (validate.ID_MAX + 1), "n", b"", None], "job id"),
    (["a", None, b"", None], "job name"),
    (["a", 3, b"", None], "job name"),
    (["a", "x" * (validate.NAME_MAX + 1), b"", None], "job name"),
    (["a", "n", "text", None], "job data"),
    (["a", "n", None, None], "job data"),
    (["a", "n", [1, 2], None], "job data"),
    (["a", "n", bytearray(b"x"), None], "job data"),
    (["a", "n", b"", {"priority": -1}], "priority"),
    (["a", "n", b"", {"nope": 1}], "nope"),
    (["a", "n", b"", "opts"], "opts"),
])
def test_bad_job_item_is_a_bad_request_naming_the_field(item: Any, field: str) -> None:
    with pytest.raises(BadRequestError, match=field):
        validate.job_item(item, MAX_DATA)


@pytest.mark.parametrize("size", [MAX_DATA + 1, MAX_DATA * 10])
def test_oversize_job_data_is_too_large(size: int) -> None:
    with pytest.raises(TooLargeError, match="job data") as info:
        validate.job_item(["a", "n", b"x" * size, None], MAX_DATA)
    assert str(size) in str(info.value)
    assert info.value.code == "TOO_LARGE"


def test_oversize_data_is_reported_before_bad_options() -> None:
    with pytest.raises(TooLargeError):
        validate.job_item(["a", "n", b"x" * (MAX_DATA + 1), {"priority": -1}], MAX_DATA)


@pytest.mark.parametrize(("item", "expected"), [
    (["a", "n", b"", None], ("a", "n", b"", None)),
    (["a", "", b"x" * MAX_DATA, None], ("a", "", b"x" * MAX_DATA, None)),
    (["x" * validate.ID_MAX, "y" * validate.NAME_MAX, b"\x01", {}],
     ("x" * validate.ID_MAX, "y" * validate.NAME_MAX, b"\x01", {})),
    (["a", "n", b"", {"priority": 3, "backoff": 10}],
     ("a", "n", b"", {"priority": 3, "backoff": ["fixed", 10]})),
])
def test_good_job_item_is_returned_normalised(item: list[Any], expected: tuple[Any, ...]) -> None:
    assert validate.job_item(item, MAX_DATA) == expected


# ======================================================================== other arguments
@pytest.mark.parametrize(("name", "message"), [
    ("", "queue name"),
    (None, "queue name"),
    (5, "queue name"),
    (b"emails", "queue name"),
    ("q" * (QUEUE_NAME_MAX + 1), "queue name"),
])
def test_bad_queue_name_is_a_bad_request(name: Any, message: str) -> None:
    with pytest.raises(BadRequestError, match=message):
        validate.queue_name(name)


@pytest.mark.parametrize("name", ["q", "emails:enrich", "ü-queue", "q" * QUEUE_NAME_MAX])
def test_good_queue_name_is_returned(name: str) -> None:
    assert validate.queue_name(name) == name


@pytest.mark.parametrize(("args", "key", "kind", "message"), [
    (None, "queue", str, "args must be a map"),
    ([], "queue", str, "args must be a map"),
    ({}, "queue", str, "missing argument 'queue'"),
    ({"queue": 1}, "queue", str, "argument 'queue' has the wrong type"),
    ({"count": "1"}, "count", int, "argument 'count' has the wrong type"),
    ({"count": True}, "count", int, "argument 'count' has the wrong type"),
    ({"count": None}, "count", int, "argument 'count' has the wrong type"),
    ({"queues": "a"}, "queues", list, "argument 'queues' has the wrong type"),
])
def test_bad_argument_is_a_bad_request_naming_it(args: Any, key: str, kind: type,
                                                 message: str) -> None:
    with pytest.raises(BadRequestError, match=message):
        validate.arg(args, key, kind)


@pytest.mark.parametrize(("args", "key", "kind", "default", "expected"), [
    ({"queue": "a"}, "queue", str, ..., "a"),
    ({"count": 3}, "count", int, ..., 3),
    ({}, "count", int, 10, 10),
    ({}, "delayed", bool, False, False),
    ({"delayed": True}, "delayed", bool, False, True),
    ({}, "pull", dict, None, None),
    ({"n": 1.5}, "n", (int, float), ..., 1.5),
])
def test_good_argument_or_default_is_returned(args: Any, key: str, kind: Any, default: Any,
                                              expected: Any) -> None:
    assert validate.arg(args, key, kind, default) == expected


@pytest.mark.parametrize("value", [True, False, "1", 1.0, None, b"\x01"])
def test_lock_token_must_be_an_integer(value: Any) -> None:
    with pytest.raises(BadRequestError, match="lock token"):
        validate.token(value)


@pytest.mark.parametrize("value", [0, 1, 2**62, -1])
def test_integer_lock_token_is_accepted(value: int) -> None:
    assert validate.token(value) == value


@pytest.mark.parametrize(("args", "message"), [
    ({}, "missing argument 'items'"),
    ({"items": "x"}, "wrong type"),
    ({"items": [["q", "id"]]}, "each of 'items'"),
    ({"items": ["q"]}, "each of 'items'"),
    ({"items": [["q", "id", 1], None]}, "each of 'items'"),
])
def test_bad_item_list_is_a_bad_request(args: Any, message: str) -> None:
    with pytest.raises(BadRequestError, match=message):
        validate.item_list(args)


def test_item_list_returns_the_items() -> None:
    items = [["q", "a", 1], ["q", "b", 2, None]]
    assert validate.item_list({"items": items}) == items
    assert validate.item_list({"acks": items}, "acks") == items


@pytest.mark.parametrize(("value", "minimum", "ok"), [
    (0, 0, True), (5, 1, True), (0, 1, False), (-1, 0, False), (True, 0, False),
    (1.0, 0, False), ("1", 0, False),
])
def test_non_neg_int_enforces_type_and_minimum(value: Any, minimum: int, ok: bool) -> None:
    if ok:
        assert validate.non_neg_int(value, "field", minimum) == value
    else:
        with pytest.raises(BadRequestError, match=f"field must be an integer >= {minimum}"):
            validate.non_neg_int(value, "field", minimum)


def test_a_trace_carrier_is_a_small_map_of_strings() -> None:
    tp = {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
    assert validate.job_opts({"trace": tp}) == {"trace": tp}
    for bad in ({}, {"traceparent": 1}, ["x"], {"k": "v" * 2000}):
        with pytest.raises(BadRequestError):
            validate.job_opts({"trace": bad})
