"""Operator commands on jobs and queues, through the client (client/jobs.py):

    shardq jobs QUEUE [--state failed] [--start 0] [--limit 20] [--json]
    shardq job QUEUE ID [--json]
    shardq retry QUEUE [ID | --all-failed]
    shardq pause QUEUE / shardq resume QUEUE
    shardq clean QUEUE --state completed --grace 1h [--limit N]

Tables fit 80 columns: headers never shrink below their own width, and
long cells (ids, reasons) are cut with an ellipsis instead. A refused
call is one red line on stderr and exit code 1.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from shardq.cli import app
from shardq.errors import ShardqError

T = TypeVar("T")

TARGET_OPT = typer.Option("http://127.0.0.1:7070", "--coordinator", envvar="SHARDQ_COORDINATOR",
                          help="Coordinator URL, or broker host:port[,host:port].")
TOKEN_OPT = typer.Option(None, "--token", envvar="SHARDQ_TOKEN", help="Cluster token.")
JSON_OPT = typer.Option(False, "--json", help="Print JSON instead of a table.")
STATES = ("waiting", "prioritized", "delayed", "active", "completed", "failed",
          "waiting-children")
_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration(text: str) -> int:
    """'90s', '15m', '1h', '2d', '500ms' or a plain number of ms -> ms.

    Raises:
        typer.BadParameter: anything else.
    """
    m = re.fullmatch(r"\s*(\d+)\s*(ms|s|m|h|d)?\s*", text)
    if m is None:
        raise typer.BadParameter(f"{text!r} is not a duration like 90s, 15m, 1h, 2d or 500ms")
    return int(m.group(1)) * _UNITS_MS[m.group(2) or "ms"]


def _run(target: str, token: str | None, call: Callable[[Any], Awaitable[T]]) -> T:
    """Connect, run `call(client)`, close; a shardq error exits 1 with one line."""
    import shardq

    async def main() -> T:
        async with await shardq.connect(target, token) as client:
            return await call(client)

    try:
        return asyncio.run(main())
    except ShardqError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {type(exc).__name__}: {exc}",
                                   highlight=False)
        raise typer.Exit(1) from None


def _when(ms: Any) -> str:
    if not ms:
        return "-"
    t = dt.datetime.fromtimestamp(int(ms) / 1000, tz=dt.UTC)
    return t.strftime("%m-%d %H:%M")


def _plain(job: dict[str, Any]) -> dict[str, Any]:
    """A job dict as JSON can carry it (bytes as text, where they are)."""
    return {k: (v.decode(errors="replace") if isinstance(v, bytes) else v)
            for k, v in job.items()}


FIXED = (("id", 20), ("state", 9), ("name", 10), ("tries", 5), ("time (UTC)", 11))


def jobs_table(jobs: list[dict[str, Any]], title: str, width: int = 80) -> Table:
    """The `shardq jobs` table for a terminal `width` wide (at least 80)."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
                  padding=(0, 1, 0, 0))
    # Every column has a width (rich would otherwise squeeze the narrow ones
    # to nothing); the reason takes what is left after the gaps between them.
    for header, w in FIXED:
        table.add_column(header, no_wrap=True, overflow="ellipsis", width=w,
                         justify="right" if header == "tries" else "left")
    rest = max(80, width) - sum(w for _, w in FIXED) - 2 * len(FIXED) - 2
    table.add_column("reason", no_wrap=True, overflow="ellipsis", width=rest)
    for j in jobs:
        when = j.get("finished_on") or j.get("processed_on") or j.get("timestamp")
        table.add_row(str(j["id"]), str(j["state"]), str(j.get("name", "")),
                      f"{j.get('attempts_made', 0)}/{j.get('attempts', 1)}", _when(when),
                      str(j.get("failed_reason") or ""))
    return table


@app.command("jobs")
def jobs(queue: str = typer.Argument(..., help="Queue name."),
         state: list[str] = typer.Option([], "--state", "-s",
                                         help=f"Only these states ({', '.join(STATES)})."),
         start: int = typer.Option(0, "--start", min=0, help="Skip this many jobs."),
         limit: int = typer.Option(20, "--limit", "-n", min=1, help="Jobs to list."),
         asc: bool = typer.Option(False, "--asc", help="Oldest first."),
         target: str = TARGET_OPT, token: str | None = TOKEN_OPT,
         json_out: bool = JSON_OPT) -> None:
    """List a queue's jobs, newest first, with the counts of every state."""
    bad = [s for s in state if s not in STATES]
    if bad:
        raise typer.BadParameter(f"unknown state(s) {', '.join(bad)}; one of {', '.join(STATES)}")

    async def call(client: Any) -> tuple[list[dict[str, Any]], dict[str, int]]:
        q = client.queue(queue)
        listed = await q.get_jobs(state or None, start, start + limit - 1, asc)
        return listed, await q.get_job_counts()

    listed, counts = _run(target, token, call)
    if json_out:
        typer.echo(json.dumps({"jobs": [_plain(j) for j in listed], "counts": counts},
                              default=str))
        return
    summary = "  ".join(f"{s} {counts.get(s, 0)}" for s in STATES if counts.get(s))
    console = Console()
    console.print(jobs_table(listed, f"{queue}: {summary or 'empty'}", console.width))
    Console().print(f"all time: {counts['completed_total']} completed, "
                    f"{counts['failed_total']} failed", highlight=False)


@app.command("job")
def job(queue: str = typer.Argument(..., help="Queue name."),
        job_id: str = typer.Argument(..., help="Job id."),
        target: str = TARGET_OPT, token: str | None = TOKEN_OPT,
        json_out: bool = JSON_OPT) -> None:
    """One job: every field, and its last log lines."""
    async def call(client: Any) -> tuple[dict[str, Any] | None, list[str]]:
        q = client.queue(queue)
        return await q.get_job(job_id), await q.get_logs(job_id)

    found, logs = _run(target, token, call)
    if found is None:
        Console(stderr=True).print(f"[red]error:[/red] no job {job_id!r} in {queue!r}",
                                   highlight=False)
        raise typer.Exit(1)
    if json_out:
        typer.echo(json.dumps({**_plain(found), "logs": logs}, default=str))
        return
    table = Table(box=box.SIMPLE_HEAD, show_header=False, pad_edge=False)
    table.add_column("field", no_wrap=True, style="bold")
    table.add_column("value", overflow="fold")
    for key, val in found.items():
        shown = _when(val) if key in ("timestamp", "processed_on", "finished_on") else val
        table.add_row(key, json.dumps(shown, default=str) if not isinstance(shown, str)
                      else shown)
    Console().print(table)
    for line in logs[-20:]:
        Console().print(f"  log: {line}", highlight=False)


@app.command("retry")
def retry(queue: str = typer.Argument(..., help="Queue name."),
          job_id: str | None = typer.Argument(None, help="The job to retry."),
          all_failed: bool = typer.Option(False, "--all-failed",
                                          help="Retry every failed job of the queue."),
          target: str = TARGET_OPT, token: str | None = TOKEN_OPT) -> None:
    """Put a failed (or completed) job - or every failed one - back to waiting."""
    if (job_id is None) == (not all_failed):
        raise typer.BadParameter("give a job ID or --all-failed (not both)")

    async def call(client: Any) -> int:
        q = client.queue(queue)
        if job_id is not None:
            await q.retry_job(job_id)
            return 1
        n: int = await q.retry_jobs("failed")
        return n

    n = _run(target, token, call)
    typer.echo(f"retried {n} job(s) in {queue}")


@app.command("pause")
def pause(queue: str = typer.Argument(..., help="Queue name."),
          target: str = TARGET_OPT, token: str | None = TOKEN_OPT) -> None:
    """Stop handing out the queue's jobs (adds still work)."""
    _run(target, token, lambda client: client.queue(queue).pause())
    typer.echo(f"paused {queue}")


@app.command("resume")
def resume(queue: str = typer.Argument(..., help="Queue name."),
           target: str = TARGET_OPT, token: str | None = TOKEN_OPT) -> None:
    """Hand out the queue's jobs again."""
    _run(target, token, lambda client: client.queue(queue).resume())
    typer.echo(f"resumed {queue}")


@app.command("clean")
def clean(queue: str = typer.Argument(..., help="Queue name."),
          state: str = typer.Option("completed", "--state",
                                    help="completed, failed, waiting, prioritized or delayed."),
          grace: str = typer.Option("0", "--grace",
                                    help="Only jobs older than this (90s, 15m, 1h, 2d)."),
          limit: int = typer.Option(0, "--limit", min=0, help="At most this many (0: all)."),
          target: str = TARGET_OPT, token: str | None = TOKEN_OPT) -> None:
    """Remove old jobs of one state."""
    if state not in ("completed", "failed", "waiting", "prioritized", "delayed"):
        raise typer.BadParameter(f"cannot clean state {state!r}")
    grace_ms = parse_duration(grace)
    n = _run(target, token, lambda client: client.queue(queue).clean(grace_ms, limit, state))
    typer.echo(f"removed {n} {state} job(s) from {queue}")
