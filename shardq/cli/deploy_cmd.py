"""`shardq deploy ...`: helpers the container image runs under Kubernetes and compose.

`broker` wraps `shardq broker` (stable id, stale-entry cleanup, then runs it);
`prestop` is the StatefulSet's preStop hook (drain only on a scale in);
`drain` drains the broker of this container (compose scale in);
`remove-drained` drops scaled-in brokers' entries; `probe` is the image's
health check. The logic lives in shardq/deploy.py; see
deploy/README.md for how they fit together.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from shardq.cli import app
from shardq.cli.admin_cmd import COORDINATOR_OPT, TOKEN_OPT

deploy_app = typer.Typer(
    help="Helpers for containers: broker wrapper, Kubernetes preStop hook, drain, probe.",
    no_args_is_help=True)
app.add_typer(deploy_app, name="deploy")

ID_FILE = Path("/tmp/shardq-broker-id")
COORD_OPT = typer.Option(..., "--coordinator", envvar="SHARDQ_COORDINATOR",
                         help="Coordinator URL, e.g. http://coordinator:7070.")
ID_FILE_OPT = typer.Option(ID_FILE, "--id-file",
                           help="Where `deploy broker` writes the id it runs as.")


def _say(message: str) -> None:
    # stderr: the broker's first stdout line must stay `READY host:port`.
    print(f"shardq deploy: {message}", file=sys.stderr, flush=True)


@deploy_app.command(
    "broker", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def broker(
    ctx: typer.Context,
    broker_id: str | None = typer.Option(
        None, "--id", envvar="SHARDQ_BROKER_ID",
        help="Broker id (Kubernetes: the pod name, e.g. broker-2). Without it, --claim."),
    claim: bool = typer.Option(
        False, "--claim", help="Take the lowest free id b1, b2... under --data-root (compose)."),
    data_root: Path = typer.Option(
        Path("/data"), help="Data volume; the broker's data dir is <data-root>/<id>."),
    coordinator: str = COORD_OPT,
    port: int = typer.Option(7101, help="Broker port (also the advertised one)."),
    advertise_host: str | None = typer.Option(
        None, help="Host to advertise with the port; `auto`: this host's own address."),
    rejoin: bool = typer.Option(
        True, help="Forget a drained entry of this id first, so it joins afresh."),
    id_file: Path = ID_FILE_OPT,
    token: str | None = TOKEN_OPT,
) -> None:
    """Start a broker with a stable id; arguments after `--` go to `shardq broker`."""
    from shardq import deploy
    from shardq.coordinator.api_client import CoordinatorApi, CoordinatorCallError

    if broker_id is None and not claim:
        raise typer.BadParameter("give --id or --claim")
    if broker_id is None:
        before = _read_id(id_file)  # a restarted container keeps its id if it is free
        broker_id, _fd = deploy.claim_broker_id(data_root, prefer=before)  # held while it runs
    (data_root / broker_id).mkdir(parents=True, exist_ok=True)
    _write_id(id_file, broker_id)
    if rejoin:
        try:
            with CoordinatorApi(coordinator, token, timeout_s=5.0) as api:
                what = deploy.clear_stale_entry(api, broker_id)
            if what == "cleared":
                _say(f"{broker_id} was drained earlier: its entry is cleared, it joins afresh")
        except CoordinatorCallError as e:  # the broker itself retries registering
            _say(f"could not check {broker_id}'s entry: {e}")
    host = deploy.own_address() if advertise_host == "auto" else advertise_host
    argv = deploy.broker_argv(
        broker_id=broker_id, data_dir=data_root / broker_id, coordinator=coordinator,
        port=port, advertise=f"{host}:{port}" if host and port else None,
        extra=list(ctx.args))
    if token:
        os.environ["SHARDQ_TOKEN"] = token  # not on argv, where `ps` shows it
    # Run `shardq broker` in this process (no second interpreter start); the
    # claim's descriptor stays open for the broker's lifetime. Exits with it.
    typer.main.get_command(app).main(args=argv, prog_name="shardq")


@deploy_app.command("prestop")
def prestop(
    coordinator: str = COORD_OPT,
    pod: str = typer.Option(
        ..., envvar=["POD_NAME", "HOSTNAME"], help="This pod's name, e.g. broker-3."),
    broker_id: str | None = typer.Option(None, "--id", help="Broker id (default: the pod name)."),
    statefulset: str | None = typer.Option(
        None, help="The StatefulSet (default: the pod name less its ordinal)."),
    timeout: float = typer.Option(
        270.0, min=1.0, help="Longest wait for the drain; keep it below "
                             "terminationGracePeriodSeconds."),
    if_unknown: str = typer.Option(
        "drain", help="When spec.replicas cannot be read: drain (safe for a scale in) or keep."),
    k8s_api: str | None = typer.Option(None, help="API URL (default: in-cluster)."),
    namespace: str | None = typer.Option(None, envvar="POD_NAMESPACE"),
    service_account_dir: Path = typer.Option(
        Path("/var/run/secrets/kubernetes.io/serviceaccount")),
    token: str | None = TOKEN_OPT,
) -> None:
    """Kubernetes preStop hook: drain only on a scale in (ordinal >= desired replicas).

    A rolling restart, an eviction or a node drain keeps the slots: they
    wait for the pod to come back on its volume.
    """
    from shardq import deploy

    if if_unknown not in ("drain", "keep"):
        raise typer.BadParameter("--if-unknown is drain or keep")
    ident = deploy.PodIdentity.parse(pod)
    sts = statefulset or ident.statefulset
    try:
        sa = deploy.ServiceAccount.in_cluster(dict(os.environ), service_account_dir,
                                              api_url=k8s_api, namespace=namespace)
        replicas = deploy.desired_replicas(sa, sts)
        action = deploy.stop_action(ident.ordinal, replicas)
        why = f"ordinal {ident.ordinal}, {sts} wants {replicas} replicas"
    except deploy.KubernetesApiError as e:
        action = deploy.StopAction(if_unknown)
        why = f"desired replicas unknown ({e})"
    _say(f"preStop {pod}: {action} ({why})")
    if action is deploy.StopAction.DRAIN:
        _drain(coordinator, token, broker_id or pod, timeout)


@deploy_app.command("drain")
def drain(
    broker_id: str | None = typer.Option(
        None, "--id", help="Broker id (default: the one in --id-file, i.e. this container's)."),
    coordinator: str = COORD_OPT,
    timeout: float = typer.Option(600.0, min=1.0, help="Longest wait."),
    id_file: Path = ID_FILE_OPT,
    token: str | None = TOKEN_OPT,
) -> None:
    """Move every slot of this container's broker away and wait (before a compose scale in)."""
    broker_id = broker_id or _read_id(id_file)
    if broker_id is None:
        raise typer.BadParameter(f"no --id and no {id_file}")
    _drain(coordinator, token, broker_id, timeout)


def _drain(coordinator: str, token: str | None, broker_id: str, timeout: float) -> None:
    from shardq import deploy
    from shardq.coordinator.api_client import CoordinatorApi

    with CoordinatorApi(coordinator, token) as api:
        outcome = deploy.drain_and_wait(api, broker_id, timeout_s=timeout)
    _say(outcome.reason)
    if not outcome.drained:
        raise typer.Exit(1)


@deploy_app.command("remove-drained")
def remove_drained(
    broker_ids: list[str] = typer.Argument(..., help="Ids of scaled-in brokers, e.g. broker-4."),
    coordinator: str = COORDINATOR_OPT,
    token: str | None = TOKEN_OPT,
) -> None:
    """Remove scaled-in brokers' entries (drained or dead, owning no slot) from the topology.

    An entry that still owns slots is kept (exit code 1): its data is on that
    broker's volume; bring it back, or see `shardq forget`.
    """
    from shardq import deploy
    from shardq.coordinator.api_client import CoordinatorApi, CoordinatorCallError

    kept = []
    try:
        with CoordinatorApi(coordinator, token) as api:
            for broker_id in broker_ids:
                what = deploy.clear_stale_entry(api, broker_id)
                _say(f"{broker_id}: " + {"new": "not in the topology", "cleared": "removed",
                                          "kept": "kept: it is serving or owns slots"}[what])
                if what == "kept":
                    kept.append(broker_id)
    except CoordinatorCallError as e:
        _say(str(e))
        raise typer.Exit(1) from None
    if kept:
        raise typer.Exit(1)


@deploy_app.command("probe")
def probe(
    target: str = typer.Argument(
        "127.0.0.1:7101", envvar="SHARDQ_PROBE_ADDR",
        help="Broker host:port (must answer HELLO) or coordinator URL (GET /healthz)."),
    timeout: float = typer.Option(3.0, min=0.1),
) -> None:
    """Health check for the image (HEALTHCHECK, Kubernetes liveness): exit 0 if healthy."""
    from shardq import deploy

    problem = deploy.probe(target, timeout)
    if problem is not None:
        _say(problem)
        raise typer.Exit(1)


def _read_id(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _write_id(path: Path, broker_id: str) -> None:
    try:
        path.write_text(broker_id + "\n")
    except OSError as e:
        _say(f"cannot write {path}: {e}")
