"""OpenTelemetry tracing, with the optional extra `shardq[otel]`.

`add` / `add_bulk` inject the current trace context (W3C `traceparent`,
through the globally configured propagator) into the job as its `trace`
option, when a span is current; the broker stores it with the job (it moves
and replays with it) and delivers it with the job. The worker then runs the
handler inside a CONSUMER span `process <queue>` whose parent is that
context - the conventions of `bullmq-otel` and
`opentelemetry-instrumentation-celery` - with the attributes below. A
handler's exception is recorded on the span and sets its status to error.

Without `opentelemetry-api` installed, or with no span current at the add,
nothing is injected and workers run handlers as usual; the check costs one
lookup per add.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .worker import Job

TRACER_NAME = "shardq"
# Span attributes (OpenTelemetry messaging conventions, plus shardq's own).
SYSTEM = "messaging.system"
DESTINATION = "messaging.destination.name"
MESSAGE_ID = "messaging.message.id"
OPERATION = "messaging.operation.type"
ATTEMPT = "shardq.job.attempt"
BROKER = "shardq.broker"
PARTITION = "shardq.partition"

_otel: Any = None  # the opentelemetry modules once looked up; False: not installed


def _modules() -> Any:
    global _otel
    if _otel is None:
        try:
            from opentelemetry import propagate, trace
        except ImportError:
            _otel = False
        else:
            _otel = (propagate, trace)
    return _otel


def carrier() -> dict[str, str] | None:
    """The current trace context as a job's `trace` option, or None."""
    mods = _modules()
    if not mods:
        return None
    propagate, trace = mods
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    out: dict[str, str] = {}
    propagate.inject(out)
    return out or None


def traced(job: Job, call: Callable[[], Any]) -> Any:
    """What the worker runs for a job that came with a trace context: `call`
    inside a CONSUMER span, child of that context (the call itself, untraced,
    without opentelemetry)."""
    mods = _modules()
    if not mods or job.trace is None:
        return call()
    return _run_in_span(mods, job, call)


async def _run_in_span(mods: Any, job: Job, call: Callable[[], Any]) -> Any:
    propagate, trace = mods
    parent = propagate.extract(job.trace)
    tracer = trace.get_tracer(TRACER_NAME)
    attributes = {SYSTEM: "shardq", DESTINATION: job.queue, MESSAGE_ID: job.id,
                  OPERATION: "process", ATTEMPT: job.attempts_started, BROKER: job.broker,
                  PARTITION: job.partition}
    with tracer.start_as_current_span(f"process {job.queue}", context=parent,
                                      kind=trace.SpanKind.CONSUMER, attributes=attributes):
        res = call()
        if inspect.isawaitable(res):
            res = await res
        return res
