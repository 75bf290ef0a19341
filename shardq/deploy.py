"""Running brokers under an orchestrator: Kubernetes, docker compose (deploy/, docs/design.md §6).

What `shardq deploy ...` (shardq/cli/deploy_cmd.py) does, as functions that
take their inputs (no environment reads here):

* `stop_action(ordinal, replicas)`: the Kubernetes preStop decision. A
  StatefulSet scaled in removes the pods whose ordinal is at or above the
  new `spec.replicas`; those must drain their slots first. Any other stop
  (rolling restart, eviction, node drain) keeps the slots: they wait for the
  pod to come back on its volume, so a restart moves nothing (docs/design.md §6).
* `desired_replicas`: `spec.replicas` of a StatefulSet, read from the
  Kubernetes API with the pod's service-account token.
* `drain_and_wait`: ask the coordinator to move every slot of a broker away
  (`leaving`) and wait until it owns none.
* `clear_stale_entry`: before a broker starts, forget a *drained* entry of
  its id (one that owns no slot), so that a pod coming back after a scale
  in joins afresh and gets slots by the scale-out rebalance, instead of
  coming back `drained`.
* `claim_broker_id`: brokers of one compose service share a volume; each
  takes the lowest free `bN` by an exclusive `flock` on `bN/.claim`, held
  for its lifetime, so ids and data dirs are stable across restarts.
* `probe`: a health check that needs the event loop, not just the kernel's
  listen backlog: a broker must answer HELLO; a coordinator GET /healthz.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx

from shardq import coordinator_http, protocol
from shardq.codec import FrameDecoder, encode_frame
from shardq.coordinator.api_client import (
    CoordinatorApi,
    CoordinatorCallError,
    CoordinatorRefused,
)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MAX_CLAIMS = 1000
_POD_RE = re.compile(r"^(?P<set>[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)-(?P<ordinal>\d+)$")
# States in which an entry that owns no slot is left over from an earlier life.
_STALE_STATES = frozenset({"drained", "dead", "draining", "leaving"})


class StopAction(StrEnum):
    """What a broker pod's preStop hook does."""

    DRAIN = "drain"
    KEEP = "keep"


@dataclass(frozen=True, slots=True)
class PodIdentity:
    """A StatefulSet pod's name split into its set and ordinal (`broker-2` -> broker, 2)."""

    statefulset: str
    ordinal: int

    @classmethod
    def parse(cls, pod_name: str) -> PodIdentity:
        """Raises ValueError for a name that is not `<statefulset>-<ordinal>`."""
        m = _POD_RE.match(pod_name)
        if m is None:
            raise ValueError(f"{pod_name!r} is not a StatefulSet pod name (<set>-<ordinal>)")
        return cls(m["set"], int(m["ordinal"]))


def stop_action(ordinal: int, replicas: int | None) -> StopAction:
    """The preStop decision (docs/design.md §6: drain only when the ordinal is at or
    above the StatefulSet's desired replicas).

    Args:
        ordinal: the pod's ordinal.
        replicas: the StatefulSet's `spec.replicas`; None when the StatefulSet
            is gone (deleted with all its pods: nobody is left to take slots).
    """
    if ordinal < 0:
        raise ValueError(f"ordinal must be >= 0, got {ordinal}")
    if replicas is None:
        return StopAction.KEEP
    return StopAction.DRAIN if ordinal >= replicas else StopAction.KEEP


class KubernetesApiError(Exception):
    """The Kubernetes API could not be asked or did not answer usefully."""


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    """How a pod reaches the Kubernetes API (in-cluster config)."""

    api_url: str
    namespace: str
    token: str | None = None
    ca_file: str | None = None

    @classmethod
    def in_cluster(cls, env: dict[str, str], sa_dir: Path = SERVICE_ACCOUNT_DIR,
                   api_url: str | None = None, namespace: str | None = None) -> ServiceAccount:
        """From the mounted service account and KUBERNETES_SERVICE_HOST/PORT.

        Raises:
            KubernetesApiError: no API address or namespace can be found.
        """
        if api_url is None:
            host = env.get("KUBERNETES_SERVICE_HOST")
            if not host:
                raise KubernetesApiError("not in a Kubernetes pod: KUBERNETES_SERVICE_HOST unset")
            port = env.get("KUBERNETES_SERVICE_PORT", "443")
            api_url = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        if namespace is None:
            namespace = env.get("POD_NAMESPACE") or _read(sa_dir / "namespace")
        if not namespace:
            raise KubernetesApiError(f"no namespace: set POD_NAMESPACE or mount {sa_dir}")
        ca = sa_dir / "ca.crt"
        return cls(api_url.rstrip("/"), namespace, _read(sa_dir / "token"),
                   str(ca) if ca.is_file() else None)


def desired_replicas(sa: ServiceAccount, statefulset: str, timeout_s: float = 5.0) -> int | None:
    """`spec.replicas` of `statefulset` (1 when unset); None when it does not exist.

    Needs `get` on `statefulsets` in the pod's namespace (deploy/k8s/rbac.yaml).

    Raises:
        KubernetesApiError: unreachable, refused (401/403...), or a malformed answer.
    """
    url = f"{sa.api_url}/apis/apps/v1/namespaces/{sa.namespace}/statefulsets/{statefulset}"
    headers = {"Accept": "application/json"}
    if sa.token:
        headers["Authorization"] = f"Bearer {sa.token}"
    try:
        r = httpx.get(url, headers=headers, timeout=timeout_s, verify=sa.ca_file or True)
    except httpx.HTTPError as e:
        raise KubernetesApiError(f"cannot reach the Kubernetes API at {sa.api_url}: {e}") from e
    if r.status_code == 404:
        return None
    if r.status_code != 200:
        raise KubernetesApiError(f"GET {url}: {r.status_code} {r.text[:200]}")
    try:
        spec = r.json().get("spec") or {}
        replicas = spec.get("replicas", 1)
    except (ValueError, AttributeError) as e:
        raise KubernetesApiError(f"GET {url}: not a StatefulSet: {r.text[:200]}") from e
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        raise KubernetesApiError(f"GET {url}: bad spec.replicas {replicas!r}")
    return replicas


@dataclass(frozen=True, slots=True)
class DrainOutcome:
    """How `drain_and_wait` ended; `drained` is True once the broker owns nothing."""

    drained: bool
    slots: int
    reason: str


def drain_and_wait(api: CoordinatorApi, broker_id: str, *, timeout_s: float,
                   poll_s: float = 0.25, retry_s: float = 5.0,
                   clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> DrainOutcome:
    """Mark `broker_id` leaving, let the coordinator move its slots away, wait until none is left.

    A rebalance that stopped with slots left (a move aborted) is asked again
    every `retry_s`. Never raises for coordinator trouble: the outcome says
    what happened, and the caller lets the stop go on either way.
    """
    deadline = clock() + timeout_s
    try:
        answer = api.drain(broker_id, leaving=True)
    except CoordinatorRefused as e:
        if e.status == 404:
            return DrainOutcome(True, 0, f"{broker_id} is not in the topology: nothing to drain")
        return DrainOutcome(False, -1, str(e))
    except CoordinatorCallError as e:
        return DrainOutcome(False, -1, str(e))
    total = int(answer.get("slots", 0))
    asked = clock()
    row: dict[str, Any] | None = None
    while True:
        try:
            row = _broker_row(api, broker_id)
            if row is None:
                return DrainOutcome(True, total, f"{broker_id} left the topology")
            if row["slots"] == 0 and row["state"] == "drained":
                return DrainOutcome(True, total, f"{broker_id} drained ({total} slots moved)")
            if clock() - asked >= retry_s and not api.rebalance_progress().get("running"):
                api.drain(broker_id, leaving=True)  # re-plans the slots still here
                asked = clock()
        except CoordinatorCallError as e:
            if clock() >= deadline:
                return DrainOutcome(False, -1, str(e))
        if clock() >= deadline:
            left = row["slots"] if row is not None else -1
            return DrainOutcome(False, left, f"{broker_id} still owns {left} slots after "
                                             f"{timeout_s:g}s")
        sleep(poll_s)


def _broker_row(api: CoordinatorApi, broker_id: str) -> dict[str, Any] | None:
    rows: list[dict[str, Any]] = api.status()["brokers"]
    return next((b for b in rows if b["id"] == broker_id), None)


def clear_stale_entry(api: CoordinatorApi, broker_id: str) -> str:
    """Before `broker_id` starts: remove its entry if it owns no slot and is not serving.

    A broker drained by a scale in stays in the topology (`drained`, later
    `dead`); registering again would bring it back `drained`, with no slot.
    Removed, it registers as new and the scale-out rebalance gives it slots.
    An entry that owns slots (a restart) is kept: they wait for it.

    Returns:
        "new" (no entry), "cleared" or "kept".

    Raises:
        CoordinatorCallError: the coordinator is unreachable or refused.
    """
    from shardq.router import Topology

    topo = api.topology()
    entry = topo.get("brokers", {}).get(broker_id)
    if entry is None:
        return "new"
    owned = Topology.from_dict(topo).slot_counts().get(broker_id, 0)
    if owned == 0 and entry.get("state") in _STALE_STATES:
        api.leave(broker_id)
        return "cleared"
    return "kept"


def claim_broker_id(root: Path, prefix: str = "b", prefer: str | None = None
                    ) -> tuple[str, int]:
    """Take the lowest `f"{prefix}{n}"` (n >= 1) that no live process holds under `root`.

    The claim is an exclusive `flock` on `root/<id>/.claim`; it lasts as long
    as the returned descriptor is open in some process (it is inheritable,
    so it also survives an exec into the broker).

    Args:
        prefer: an id to try first (the one this container ran as before a
            restart), so a restarted container keeps its id when it is free.

    Returns:
        (broker id, the descriptor holding the claim).

    Raises:
        OSError: `root` is not writable. RuntimeError: MAX_CLAIMS ids are held.
    """
    candidates = [f"{prefix}{n}" for n in range(1, MAX_CLAIMS + 1)]
    if prefer in candidates:
        candidates.insert(0, prefer)
    for broker_id in candidates:
        fd = _try_claim(root / broker_id)
        if fd is not None:
            return broker_id, fd
    raise RuntimeError(f"all {MAX_CLAIMS} broker ids under {root} are held")


def _try_claim(data_dir: Path) -> int | None:
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / ".claim", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.set_inheritable(fd, True)
    return fd


def broker_argv(*, broker_id: str, data_dir: Path, coordinator: str, port: int,
                advertise: str | None, extra: list[str]) -> list[str]:
    """`shardq broker ...` arguments (after `python -m shardq`) for the wrapper to run."""
    argv = ["broker", "--id", broker_id, "--data-dir", str(data_dir), "--port", str(port),
            "--coordinator", coordinator]
    if advertise:
        argv += ["--advertise", advertise]
    return argv + extra


def own_address() -> str:
    """This host's address as its own name resolves (a container's IP on its network)."""
    return socket.gethostbyname(socket.gethostname())


def probe(target: str, timeout_s: float = 3.0) -> str | None:
    """Health check; None when healthy, else why not.

    `target` is a coordinator URL (`http://host:port`: GET /healthz must be
    200) or a broker `host:port` (it must answer HELLO, with `ok` or `AUTH`:
    either proves its event loop is serving).
    """
    if target.startswith(("http://", "https://")):
        try:
            with coordinator_http.sync_client(target, timeout_s=timeout_s) as http:
                r = http.get("/healthz")
        except httpx.HTTPError as e:
            return f"coordinator unreachable: {e}"
        return None if r.status_code == 200 else f"coordinator /healthz: {r.status_code}"
    host, _, port = target.rpartition(":")
    try:
        return _hello(host.strip("[]") or "127.0.0.1", int(port), timeout_s)
    except (OSError, ValueError) as e:
        return f"broker at {target}: {e}"


def _hello(host: str, port: int, timeout_s: float) -> str | None:
    hello = [1, protocol.HELLO, {"version": protocol.PROTOCOL_VERSION, "client": "probe"}]
    decoder = FrameDecoder()
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.settimeout(timeout_s)
        sock.sendall(encode_frame(hello))
        while True:
            data = sock.recv(65536)
            if not data:
                return "broker closed the connection"
            for frame in decoder.feed(data):
                if isinstance(frame, list) and len(frame) >= 2 and frame[0] == 1:
                    status = frame[1]
                    return None if status in (protocol.OK, "AUTH") else f"HELLO: {status}"


def _read(path: Path) -> str | None:
    with contextlib.suppress(OSError):
        return path.read_text().strip() or None
    return None
