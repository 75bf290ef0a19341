"""The public names of `shardq`: complete, sorted, importable."""

from __future__ import annotations

import shardq
import shardq.errors


def test_all_is_sorted() -> None:
    assert shardq.__all__ == sorted(shardq.__all__)


def test_all_lists_the_client_api_and_every_error_class() -> None:
    errors = {
        name for name, obj in vars(shardq.errors).items()
        if isinstance(obj, type) and issubclass(obj, Exception)
        and obj.__module__ == "shardq.errors"
    }
    expected = errors | {"connect", "Client", "Queue", "Worker", "Job"}
    assert set(shardq.__all__) == expected


def test_every_name_in_all_resolves() -> None:
    for name in shardq.__all__:
        assert getattr(shardq, name) is not None
    assert shardq.Client is shardq.client.Client
    assert shardq.MovedError is shardq.errors.MovedError


def test_star_import_gives_the_same_names() -> None:
    ns: dict[str, object] = {}
    exec("from shardq import *", ns)
    assert set(shardq.__all__) <= set(ns)
