"""`shardq[otel]` across brokers: a span current at `add` is the parent of
the worker's `process <queue>` span, for a job whose queue moved to another
broker before it ran (the trace context travels in the handoff) and for one
on a third broker; attributes name the queue, job, attempt and broker, and
a handler's exception marks its span as an error."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import shardq
from shardq.client import tracing
from tests.aio import run, running, until

from ..conftest import queue_on
from .conftest import SplitCluster, synced_topology
from .test_jobs_cluster import move

pytestmark = pytest.mark.slow

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def provider() -> None:
    # The global provider can be set once per process; later sets are ignored.
    p = TracerProvider()
    p.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(p)


def test_one_trace_from_the_producer_to_workers_on_two_brokers(
        split_cluster: SplitCluster) -> None:
    c = split_cluster
    topo = synced_topology(c.url)
    moving, staying = queue_on(topo, "b1", "traced"), queue_on(topo, "b3", "traced")
    EXPORTER.clear()
    tracer = trace.get_tracer("test-producer")

    async def main() -> dict[str, Any]:
        async with await shardq.connect(c.url) as client:
            with tracer.start_as_current_span("request") as parent:
                a = await client.queue(moving).add("n", {}, job_id="a")
                [b] = await client.queue(staying).add_bulk([("n", {"fail": True},
                                                             {"job_id": "b"})])
            await client.queue(moving).add("n", {}, job_id="untraced")  # no span current
            await move(c.url, moving, "b2")
            ended: set[str] = set()

            async def handle(job: shardq.Job) -> None:
                ended.add(job.id)
                if job.data.get("fail"):
                    raise RuntimeError("refused")

            async with running(client.worker([moving, staying], handle, concurrency=3)):
                await until(lambda: len(ended) == 3, "3 jobs to run")
            return {"parent": parent.get_span_context(), "ids": (a, b)}

    got = run(main())
    parent = got["parent"]
    spans = {s.attributes[tracing.MESSAGE_ID]: s for s in EXPORTER.get_finished_spans()
             if s.name.startswith("process ")}
    assert set(spans) == {"a", "b"}, spans  # the job added outside a span has none
    for jid, queue, broker in (("a", moving, "b2"), ("b", staying, "b3")):
        span = spans[jid]
        assert span.kind == trace.SpanKind.CONSUMER and span.name == f"process {queue}"
        assert span.context.trace_id == parent.trace_id
        assert span.parent is not None and span.parent.span_id == parent.span_id
        attrs = dict(span.attributes or {})
        assert attrs[tracing.DESTINATION] == queue and attrs[tracing.ATTEMPT] == 1
        assert attrs[tracing.BROKER] == broker, attrs
    assert spans["a"].status.is_ok and not spans["b"].status.is_ok
    assert any(e.name == "exception" for e in spans["b"].events)
