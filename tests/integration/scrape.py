"""Read one sample from a real broker's /metrics (started with --metrics-port 0)."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Proc


def metric(broker: Proc, sample: str) -> float:
    """The value of `sample` (a name as exposed, e.g. `..._total`) for this broker."""
    url = f"http://{broker.line_after_ready('METRICS ')}/metrics"
    text = httpx.get(url, timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample:
                return float(s.value)
    raise AssertionError(f"no sample {sample} in {url}")
