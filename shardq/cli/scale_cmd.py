"""`shardq drain|undrain|rebalance|scale out|scale in`: moving slots (docs/design.md §6).

All of them talk to the coordinator's HTTP API (`--coordinator`, `--token`);
`scale out|in` also talk to a local `shardq cluster up` through its control
port, found in `--data-dir`/cluster.json (coordinator/cluster_control.py),
to start or stop broker processes. Progress bars go to stderr, so `--json`
output on stdout stays clean. Ctrl-C stops waiting, never the moves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shardq.cli import app
from shardq.cli.admin_cmd import COORDINATOR_OPT, JSON_OPT, TOKEN_OPT
from shardq.coordinator.api_client import DEFAULT_URL, CoordinatorApi, CoordinatorCallError
from shardq.coordinator.cluster_control import ControlError, LocalCluster

scale_app = typer.Typer(help="Add or remove brokers (local cluster) and move slots.",
                        no_args_is_help=True)
app.add_typer(scale_app, name="scale")

POLL_S = 0.25
JOIN_TIMEOUT_S = 60.0
MOVE_WAIT_S = 120.0
NO_WAIT_OPT = typer.Option(False, "--no-wait", help="Return at once; do not wait for the moves.")
DATA_DIR_OPT = typer.Option(None, "--data-dir", envvar="SHARDQ_DATA_DIR",
                            help="The local cluster's data dir (as given to `cluster up`; "
                                 "default: the one registered for --coordinator, else "
                                 "./shardq-data).")
DEFAULT_DATA_DIR = Path("shardq-data")

err = Console(stderr=True)


class _Failed(Exception):
    """The command could not do what was asked; the message says why."""


def _run(coordinator: str | None, token: str | None,
         body: Callable[[CoordinatorApi], None]) -> None:
    """Run `body` with an API client; a failure is one red line and exit code 1."""
    try:
        with CoordinatorApi(coordinator or DEFAULT_URL, token) as api:
            body(api)
    except (CoordinatorCallError, ControlError, _Failed) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("stopped waiting; the moves go on (see `shardq rebalance --help`)")
        raise typer.Exit(130) from None


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data))


# -- drain / undrain ----------------------------------------------------------


@app.command("drain")
def drain(broker_id: str = typer.Argument(..., help="The broker to empty, e.g. b3."),
          no_wait: bool = NO_WAIT_OPT, coordinator: str = COORDINATOR_OPT,
          token: str | None = TOKEN_OPT, json_out: bool = JSON_OPT) -> None:
    """Take a broker off the ring and move all its slots to the others; waits until drained."""
    def body(api: CoordinatorApi) -> None:
        answer = api.drain(broker_id)
        if not no_wait:
            answer = _wait_drained(api, broker_id, int(answer["slots"]), json_out)
        if json_out:
            _echo_json(answer)
        elif no_wait:
            err.print(f"{broker_id} is {answer['state']}: moving {answer['slots']} slots "
                      f"({answer['moves']} moves); `shardq rebalance` shows progress",
                      highlight=False)
        else:
            err.print(f"{broker_id} drained: {answer['slots_moved']} slots moved "
                      f"(epoch {answer['epoch']})", highlight=False)

    _run(coordinator, token, body)


@app.command("move")
def move(queue: str = typer.Argument(..., help="The queue to pin, e.g. emails."),
         to: str = typer.Option(..., "--to", help="The broker to move it to, e.g. b2."),
         no_wait: bool = NO_WAIT_OPT, coordinator: str = COORDINATOR_OPT,
         token: str | None = TOKEN_OPT, json_out: bool = JSON_OPT) -> None:
    """Pin a (hot) queue's slot to a broker and move it there; waits for the commit."""
    def body(api: CoordinatorApi) -> None:
        from shardq.router import Topology

        answer = api.move_queue(queue, to)
        deadline = time.monotonic() + MOVE_WAIT_S
        while not no_wait and Topology.from_dict(api.topology()).owner_of_slot(
                answer["slot"]) != to:
            if time.monotonic() > deadline:
                err.print(f"[red]the move of {queue} to {to} did not commit within "
                          f"{MOVE_WAIT_S:.0f}s[/red]; see `shardq rebalance`")
                raise typer.Exit(1)
            time.sleep(0.1)
        if json_out:
            _echo_json(answer)
        else:
            err.print(f"{queue} (slot {answer['slot']}) pinned to {to}"
                      + ("" if no_wait else " and moved"), highlight=False)

    _run(coordinator, token, body)


@app.command("undrain")
def undrain(broker_id: str = typer.Argument(..., help="The broker to put back, e.g. b3."),
            coordinator: str = COORDINATOR_OPT, token: str | None = TOKEN_OPT,
            json_out: bool = JSON_OPT) -> None:
    """Put a drained (or draining) broker back on the ring; slots move back onto it."""
    def body(api: CoordinatorApi) -> None:
        answer = api.undrain(broker_id)
        if json_out:
            _echo_json(answer)
        else:
            err.print(f"{broker_id} is {answer['state']} (epoch {answer['epoch']}); "
                      f"{answer['moves']} moves planned onto the ring", highlight=False)

    _run(coordinator, token, body)


def _broker_row(api: CoordinatorApi, broker_id: str) -> dict[str, Any] | None:
    return next((b for b in api.status()["brokers"] if b["id"] == broker_id), None)


def _wait_drained(api: CoordinatorApi, broker_id: str, total: int, quiet: bool
                  ) -> dict[str, Any]:
    """Until `broker_id` owns nothing (state `drained`); a progress bar over its slots.

    Raises:
        _Failed: the rebalance stopped with slots left (moves failed), or the
            broker died or went away.
    """
    with _bar(quiet) as bar:
        task = bar.add_task(f"draining {broker_id}", total=max(total, 1))
        while True:
            row = _broker_row(api, broker_id)
            if row is None:
                raise _Failed(f"{broker_id} left the topology while draining")
            bar.update(task, completed=total - row["slots"])
            if row["state"] == "drained" or (row["slots"] == 0 and row["state"] != "draining"
                                             and row["state"] != "leaving"):
                bar.update(task, completed=max(total, 1))
                return {"id": broker_id, "state": row["state"], "slots_moved": total,
                        "epoch": api.status()["epoch"]}
            if row["state"] not in ("draining", "leaving"):
                raise _Failed(f"{broker_id} is {row['state']} with {row['slots']} slots left "
                              "(undrained, or dead: restart it and drain again)")
            progress = api.rebalance_progress()
            if not progress["running"]:
                raise _Failed(_stopped_reason(progress, f"{broker_id} still owns "
                                                        f"{row['slots']} slots"))
            time.sleep(POLL_S)


def _stopped_reason(progress: dict[str, Any], what: str) -> str:
    errors = "; ".join(progress.get("errors", [])[-3:])
    cancelled = " (cancelled)" if progress.get("cancelled") else ""
    return (f"the rebalance stopped{cancelled}: {what}; {progress['failed']} moves failed"
            f"{': ' + errors if errors else ''}. Run the command again to retry.")


def _bar(quiet: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, disable=quiet, transient=False)


# -- rebalance ----------------------------------------------------------------


@app.command("rebalance")
def rebalance(dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan only."),
              cancel: bool = typer.Option(
                  False, "--cancel", help="Stop after the moves in flight."),
              no_wait: bool = NO_WAIT_OPT, coordinator: str = COORDINATOR_OPT,
              token: str | None = TOKEN_OPT, json_out: bool = JSON_OPT) -> None:
    """Move every slot whose owner is not its ring target (joining brokers are activated)."""
    if dry_run and cancel:
        err.print("[red]error:[/red] --dry-run and --cancel exclude each other")
        raise typer.Exit(2)

    def body(api: CoordinatorApi) -> None:
        if cancel:
            progress = api.rebalance_cancel()
            if json_out:
                _echo_json(progress)
            else:
                err.print(f"cancelled: {len(progress['moves_in_flight'])} moves in flight "
                          f"finish; {progress['done']} done, {progress['failed']} failed",
                          highlight=False)
            return
        plan = api.rebalance(dry_run=dry_run)
        if dry_run:
            if json_out:
                _echo_json(plan)
            else:
                _print_plan(plan)
            return
        if not json_out:
            err.print(f"rebalance: {len(plan['moves'])} moves, {plan['slots']} slots",
                      highlight=False)
        progress = api.rebalance_progress() if no_wait else _wait_rebalance(api, json_out)
        if json_out:
            _echo_json(progress)
        if progress["failed"] and not no_wait:
            raise _Failed(_stopped_reason(progress, "some slots did not move"))

    _run(coordinator, token, body)


def _print_plan(plan: dict[str, Any]) -> None:
    console = Console()
    if not plan["moves"]:
        console.print(f"nothing to move: every slot is on its ring target (epoch "
                      f"{plan['epoch']})", highlight=False)
        return
    moves = Table(title=f"plan at epoch {plan['epoch']}: {len(plan['moves'])} moves, "
                        f"{plan['slots']} slots", box=box.SIMPLE_HEAD)
    for col in ("source", "target", "slots", "first", "last"):
        moves.add_column(col, justify="left" if col in ("source", "target") else "right")
    for mv in plan["moves"]:
        moves.add_row(mv["source"], mv["target"], str(mv["slots"]), str(mv["first"]),
                      str(mv["last"]))
    console.print(moves)
    if plan.get("activate"):
        console.print(f"joining brokers made active first: {', '.join(plan['activate'])}",
                      highlight=False)
    load = Table(title="slots per broker", box=box.SIMPLE_HEAD)
    for col in ("broker", "before", "after", "change"):
        load.add_column(col, justify="left" if col == "broker" else "right")
    before, after = plan["load_before"], plan["load_after"]
    for bid in sorted(set(before) | set(after), key=_natural):
        b, a = before.get(bid, 0), after.get(bid, 0)
        load.add_row(bid, str(b), str(a), f"{a - b:+d}" if a != b else "")
    console.print(load)


def _wait_rebalance(api: CoordinatorApi, quiet: bool) -> dict[str, Any]:
    """Until the rebalance run is over; a progress bar over its moves."""
    with _bar(quiet) as bar:
        task = bar.add_task("moving slots", total=None)
        while True:
            p = api.rebalance_progress()
            bar.update(task, total=max(p["total"], 1), completed=p["done"] + p["failed"],
                       description=f"moving slots ({p['slots_moved']} moved)")
            if not p["running"]:
                return p
            time.sleep(POLL_S)


# -- scale out / in -----------------------------------------------------------


def find_local(data_dir: Path | None, coordinator: str | None,
               token: str | None) -> LocalCluster:
    """The local `cluster up` to start or stop brokers with: the one in
    `data_dir`, else the one registered for `coordinator` (from any current
    directory), else the one in ./shardq-data.

    Raises:
        ControlError: none of them is running.
    """
    from shardq.cli import cluster_registry
    from shardq.coordinator.cluster_control import find_registered

    if data_dir is not None:
        return LocalCluster(data_dir, token)
    if coordinator is not None:
        found = find_registered(cluster_registry(), coordinator)
        if found is not None:
            return LocalCluster(found, token)
        try:
            local = LocalCluster(DEFAULT_DATA_DIR, token)
        except ControlError:
            local = None
        if local is None or not _same_url(local.coordinator, coordinator):
            raise ControlError(
                f"no local cluster (`shardq cluster up`) runs with the coordinator "
                f"{coordinator} on this machine; pass --data-dir, or, where brokers are "
                "not supervised (Kubernetes), scale the StatefulSet instead")
        return local
    return LocalCluster(DEFAULT_DATA_DIR, token)


def _same_url(a: str, b: str) -> bool:
    from shardq.coordinator.cluster_control import url_key

    return url_key(a) == url_key(b)


@scale_app.command("out")
def scale_out(n: int = typer.Option(1, "-n", "--brokers", min=1, max=64,
                                    help="Brokers to add."),
              no_wait: bool = NO_WAIT_OPT, data_dir: Path | None = DATA_DIR_OPT,
              coordinator: str | None = typer.Option(
                  None, "--coordinator", envvar="SHARDQ_COORDINATOR",
                  help="Coordinator URL (default: the local cluster's)."),
              token: str | None = TOKEN_OPT, json_out: bool = JSON_OPT) -> None:
    """Start N more brokers in the local cluster, then move about N/(n+N) of the slots onto them.

    Returns once they are active and the rebalance finished (--no-wait: at once).
    On Kubernetes, scale the StatefulSet instead: new brokers join by themselves.
    """
    try:
        local = find_local(data_dir, coordinator, token)
    except ControlError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(1) from None

    def body(api: CoordinatorApi) -> None:
        new = local.add(n)
        ids = [b["id"] for b in new]
        if not json_out:
            for b in new:
                err.print(f"started {b['id']} at {b['addr']}", highlight=False)
        if no_wait:
            if json_out:
                _echo_json({"brokers": new})
            return
        _wait_active(api, ids)
        progress = _wait_rebalance(api, json_out)
        status = api.status()
        if json_out:
            _echo_json({"brokers": new, "rebalance": progress, "status": status})
        else:
            slots = {b["id"]: b["slots"] for b in status["brokers"]}
            err.print(f"{', '.join(f'{i} ({slots.get(i, 0)} slots)' for i in ids)} active; "
                      f"{progress['slots_moved']} slots moved at epoch {status['epoch']}",
                      highlight=False)
        if progress["failed"]:
            raise _Failed(_stopped_reason(progress, "some slots did not move"))

    _run(coordinator or local.coordinator, local.coordinator_token(), body)


def _wait_active(api: CoordinatorApi, ids: list[str]) -> None:
    """Until every id is active; a broker still joining (auto rebalance off) gets a rebalance."""
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    asked = False
    while True:
        states = {b["id"]: b["state"] for b in api.status()["brokers"]}
        if all(states.get(i) == "active" for i in ids):
            return
        if not asked and all(states.get(i) in ("active", "joining") for i in ids):
            api.rebalance()  # activates joining brokers (a no-op for a running rebalance)
            asked = True
        if time.monotonic() > deadline:
            raise _Failed(f"brokers not active after {JOIN_TIMEOUT_S:g}s: "
                          f"{ {i: states.get(i) for i in ids} }")
        time.sleep(POLL_S)


@scale_app.command("in")
def scale_in(broker_id: str = typer.Option(..., "--broker", help="The broker to remove."),
             data_dir: Path | None = DATA_DIR_OPT,
             wait: bool = typer.Option(
                 False, "--wait", help="Without a local supervisor: wait for the broker's "
                                       "process to stop, then remove it from the topology."),
             coordinator: str | None = typer.Option(
                 None, "--coordinator", envvar="SHARDQ_COORDINATOR",
                 help="Coordinator URL (default: the local cluster's, else "
                      f"{DEFAULT_URL})."),
             token: str | None = TOKEN_OPT, json_out: bool = JSON_OPT) -> None:
    """Drain a broker, stop it, and remove it from the topology.

    In a local cluster (found by --data-dir or --coordinator) the supervisor
    stops it (SIGTERM). Elsewhere (Kubernetes) the command drains it, says
    what to stop, and returns; run it again with --wait once the process is
    going away (or at once, to wait for that) and it removes the broker.
    """
    try:
        local: LocalCluster | None = find_local(data_dir, coordinator, token)
    except ControlError:
        local = None

    def body(api: CoordinatorApi) -> None:
        answer = api.drain(broker_id, leaving=True)
        _wait_drained(api, broker_id, int(answer["slots"]), json_out)
        code = None
        if local is not None and broker_id in local.info.brokers:
            code = local.stop(broker_id)
        elif not wait:
            if json_out:
                _echo_json({"id": broker_id, "slots_moved": answer["slots"], "drained": True,
                            "removed": False})
            else:
                err.print(f"{broker_id} is drained ({answer['slots']} slots moved). No local "
                          f"supervisor runs it: stop its process (SIGTERM; on Kubernetes, "
                          f"scale the StatefulSet down), then run `shardq scale in --broker "
                          f"{broker_id} --wait` to remove it from the topology.",
                          highlight=False)
            return
        else:
            if not json_out:
                err.print(f"{broker_id} is drained: waiting for its process to stop "
                          "heartbeating", highlight=False)
            _wait_state(api, broker_id, "dead")
        api.leave(broker_id)
        _wait_gone(api, broker_id)
        epoch = api.status()["epoch"]
        if json_out:
            _echo_json({"id": broker_id, "slots_moved": answer["slots"], "exit_code": code,
                        "epoch": epoch})
        else:
            err.print(f"{broker_id} drained ({answer['slots']} slots moved), stopped and "
                      f"removed at epoch {epoch}", highlight=False)

    _run(coordinator or (local.coordinator if local else None),
         local.coordinator_token() if local else token, body)


def _wait_state(api: CoordinatorApi, broker_id: str, state: str) -> None:
    while (row := _broker_row(api, broker_id)) is not None and row["state"] != state:
        time.sleep(POLL_S)


def _wait_gone(api: CoordinatorApi, broker_id: str) -> None:
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while broker_id in api.topology()["brokers"]:
        if time.monotonic() > deadline:
            raise _Failed(f"{broker_id} is still in the topology")
        time.sleep(POLL_S)


def _natural(s: str) -> list[Any]:
    from shardq.coordinator.membership import natural_key

    return natural_key(s)
