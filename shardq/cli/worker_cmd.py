"""`shardq worker module:func --queue Q`: run a handler imported by path, as
`celery -A`, `arq` and `rq worker` do.

The handler is `async def f(job)` or a plain function (run on the loop, or
in a process pool with `--processes`). One log line per failed attempt.
SIGTERM or SIGINT drains: no new pulls, jobs in flight finish, their acks
are flushed, exit 0. A handler that cannot be imported exits 2 with what
went wrong.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import typer

from shardq.cli import app

log = logging.getLogger("shardq.cli.worker")
BAD_HANDLER_EXIT = 2


class HandlerImportError(Exception):
    """The `module:function` path does not name a callable."""


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    handler_path: str
    queues: tuple[str, ...]
    target: str
    token: str | None
    concurrency: int
    processes: int


def load_handler(path: str) -> Callable[..., Any]:
    """Import `module:function` (`module.sub:obj.attr` too); the current
    directory is importable, as with celery and rq.

    Raises:
        HandlerImportError: a bad path, a module that fails to import, a
            missing attribute, or something not callable.
    """
    mod_name, sep, attr = path.partition(":")
    if not sep or not mod_name or not attr:
        raise HandlerImportError(f"handler must be 'module:function', got {path!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(mod_name)
    except Exception as exc:  # any error while importing user code is reported as such
        raise HandlerImportError(f"cannot import module {mod_name!r}: "
                                 f"{type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HandlerImportError(f"module {mod_name!r} has no {attr!r}") from None
    if not callable(obj):
        raise HandlerImportError(f"{path!r} is not callable")
    return obj  # type: ignore[no-any-return]


async def serve(config: WorkerConfig, handler: Callable[..., Any]) -> None:
    """Run one worker until SIGTERM/SIGINT, then drain (docs: module docstring)."""
    import shardq

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with await shardq.connect(config.target, token=config.token) as client:
        worker = client.worker(list(config.queues), handler, concurrency=config.concurrency,
                               processes=config.processes)
        run = asyncio.create_task(worker.run())
        print(f"READY worker {','.join(config.queues)}", flush=True)
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({run, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if run in done:
            waiter.cancel()
            run.result()  # the worker ended by itself: its error, if any, goes out
            return
        log.warning("draining: %d job(s) in flight", worker.running)
        await worker.close()
        await run
        log.warning("drained: %d completed, %d failed", worker.completed, worker.failed)


@app.command("worker")
def worker(
    handler: str = typer.Argument(..., help="The handler as module:function."),
    queue: list[str] = typer.Option(..., "--queue", "-q", help="Queue to work (repeatable)."),
    concurrency: int = typer.Option(10, "--concurrency", "-c", min=1,
                                    help="Jobs run at once."),
    processes: int = typer.Option(0, "--processes", min=0,
                                  help="Run a sync handler in this many processes."),
    coordinator: str = typer.Option("http://127.0.0.1:7070", "--coordinator",
                                    envvar="SHARDQ_COORDINATOR",
                                    help="Coordinator URL, or broker host:port[,host:port]."),
    token: str | None = typer.Option(None, "--token", envvar="SHARDQ_TOKEN",
                                     help="Cluster token."),
    log_level: str = typer.Option("INFO", envvar="SHARDQ_LOG_LEVEL"),
) -> None:
    """Run a worker on QUEUEs with a handler imported by path."""
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        fn = load_handler(handler)
    except HandlerImportError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(BAD_HANDLER_EXIT) from None
    if processes and inspect.iscoroutinefunction(fn):
        typer.echo("error: --processes needs a plain (sync) handler function", err=True)
        raise typer.Exit(BAD_HANDLER_EXIT)
    config = WorkerConfig(handler, tuple(queue), coordinator, token, concurrency, processes)
    asyncio.run(serve(config, fn))
