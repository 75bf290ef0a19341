"""shardq/deploy.py without a cluster: the preStop decision, the Kubernetes API read (against
a fake API), id claims, argv, probes, and `shardq deploy prestop` when Kubernetes is unsure."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shardq import deploy
from shardq.cli import app
from shardq.deploy import KubernetesApiError, PodIdentity, ServiceAccount, StopAction

from .kube import NAMESPACE, STATEFULSET, TOKEN, FakeKubeApi


@pytest.fixture
def kube() -> Iterator[FakeKubeApi]:
    api = FakeKubeApi()
    yield api
    api.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(("pod", "statefulset", "ordinal"), [
    ("broker-0", "broker", 0),
    ("broker-12", "broker", 12),
    ("shardq-broker-3", "shardq-broker", 3),
])
def test_pod_name_gives_statefulset_and_ordinal(pod: str, statefulset: str, ordinal: int) -> None:
    assert PodIdentity.parse(pod) == PodIdentity(statefulset, ordinal)


@pytest.mark.parametrize("pod", ["broker", "broker-", "-3", "Broker-1", "broker-1a", ""])
def test_a_name_that_is_not_a_statefulset_pod_is_refused(pod: str) -> None:
    with pytest.raises(ValueError, match="StatefulSet pod name"):
        PodIdentity.parse(pod)


@pytest.mark.parametrize(("ordinal", "replicas", "action"), [
    # rolling restart / eviction: the pod is still wanted -> its slots wait for it
    (0, 3, StopAction.KEEP), (2, 3, StopAction.KEEP), (4, 5, StopAction.KEEP),
    # scale in 5 -> 2: broker-2, -3, -4 go away -> drain
    (2, 2, StopAction.DRAIN), (3, 2, StopAction.DRAIN), (4, 2, StopAction.DRAIN),
    # scale to 0: everyone drains (the last one has nobody left; the hook gives up)
    (0, 0, StopAction.DRAIN),
    # the StatefulSet is being deleted with all its pods: no one would take the slots
    (0, None, StopAction.KEEP), (7, None, StopAction.KEEP),
])
def test_prestop_drains_only_pods_at_or_above_the_desired_replicas(
        ordinal: int, replicas: int | None, action: StopAction) -> None:
    assert deploy.stop_action(ordinal, replicas) is action


def test_a_negative_ordinal_is_a_bug() -> None:
    with pytest.raises(ValueError):
        deploy.stop_action(-1, 3)


def test_service_account_from_the_pod(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("tok\n")
    (tmp_path / "namespace").write_text("prod\n")
    (tmp_path / "ca.crt").write_text("pem")
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    sa = ServiceAccount.in_cluster(env, tmp_path)
    assert sa == ServiceAccount("https://10.96.0.1:443", "prod", "tok", str(tmp_path / "ca.crt"))
    v6 = ServiceAccount.in_cluster({"KUBERNETES_SERVICE_HOST": "fd00::1",
                                    "POD_NAMESPACE": "ns"}, tmp_path)
    assert (v6.api_url, v6.namespace) == ("https://[fd00::1]:443", "ns")
    with pytest.raises(KubernetesApiError, match="not in a Kubernetes pod"):
        ServiceAccount.in_cluster({}, tmp_path)
    with pytest.raises(KubernetesApiError, match="no namespace"):
        ServiceAccount.in_cluster(env, tmp_path / "missing")


def test_desired_replicas_reads_the_statefulset_with_the_pods_token(kube: FakeKubeApi) -> None:
    sa = ServiceAccount(kube.url(), NAMESPACE, TOKEN)
    kube.replicas = 5
    assert deploy.desired_replicas(sa, STATEFULSET) == 5
    kube.replicas = 2  # kubectl scale statefulset broker --replicas=2
    assert deploy.desired_replicas(sa, STATEFULSET) == 2
    path = f"/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets/{STATEFULSET}"
    assert kube.requests == [(path, f"Bearer {TOKEN}")] * 2


def test_desired_replicas_is_none_for_a_deleted_statefulset(kube: FakeKubeApi) -> None:
    sa = ServiceAccount(kube.url(), NAMESPACE, TOKEN)
    kube.replicas = None
    assert deploy.desired_replicas(sa, STATEFULSET) is None
    assert deploy.desired_replicas(sa, "other") is None


@pytest.mark.parametrize("status", [401, 403, 500])
def test_a_refusing_api_is_an_error_not_a_decision(kube: FakeKubeApi, status: int) -> None:
    kube.status = status
    with pytest.raises(KubernetesApiError, match=str(status)):
        deploy.desired_replicas(ServiceAccount(kube.url(), NAMESPACE), STATEFULSET)


def test_an_unreachable_api_is_an_error() -> None:
    sa = ServiceAccount(f"http://127.0.0.1:{closed_port()}", NAMESPACE)
    with pytest.raises(KubernetesApiError, match="cannot reach"):
        deploy.desired_replicas(sa, STATEFULSET, timeout_s=2)


def prestop(kube_url: str, coordinator: str, pod: str, *extra: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, [
        "deploy", "prestop", "--pod", pod, "--k8s-api", kube_url, "--namespace", NAMESPACE,
        "--service-account-dir", "/nonexistent", "--coordinator", coordinator, "--timeout", "5",
        *extra])
    return res.exit_code, res.output


def test_prestop_keeps_slots_on_a_restart_without_asking_the_coordinator(
        kube: FakeKubeApi) -> None:
    nobody = f"http://127.0.0.1:{closed_port()}"
    kube.replicas = 3
    code, out = prestop(kube.url(), nobody, "broker-2")
    assert (code, "keep (ordinal 2, broker wants 3 replicas)" in out) == (0, True), out
    kube.replicas = None
    code, out = prestop(kube.url(), nobody, "broker-0")
    assert code == 0 and "keep" in out, out


def test_prestop_drains_when_the_replicas_cannot_be_read_unless_told_to_keep(
        kube: FakeKubeApi) -> None:
    nobody = f"http://127.0.0.1:{closed_port()}"
    kube.status = 403  # e.g. the Role is missing
    code, out = prestop(kube.url(), nobody, "broker-1")
    assert "drain (desired replicas unknown" in out
    assert code == 1 and "cannot reach the coordinator" in out, out  # and says why it failed
    code, out = prestop(kube.url(), nobody, "broker-1", "--if-unknown", "keep")
    assert code == 0 and "keep (desired replicas unknown" in out, out


def test_ids_are_claimed_lowest_first_and_held_while_the_descriptor_is_open(
        tmp_path: Path) -> None:
    b1, fd1 = deploy.claim_broker_id(tmp_path)
    b2, fd2 = deploy.claim_broker_id(tmp_path)
    assert (b1, b2) == ("b1", "b2")
    assert (tmp_path / "b1").is_dir() and os.get_inheritable(fd1)
    os.close(fd1)  # the broker holding b1 exited
    again, fd3 = deploy.claim_broker_id(tmp_path)
    assert again == "b1"
    b3, fd4 = deploy.claim_broker_id(tmp_path, prefer="b7")  # a restarted container's old id
    assert b3 == "b7"
    b4, fd5 = deploy.claim_broker_id(tmp_path, prefer="b2")  # held: the lowest free instead
    assert b4 == "b3"
    for fd in (fd2, fd3, fd4, fd5):
        os.close(fd)


def test_broker_argv_passes_the_rest_through() -> None:
    argv = deploy.broker_argv(broker_id="broker-2", data_dir=Path("/data/broker-2"),
                              coordinator="http://coordinator:7070", port=7101,
                              advertise="broker-2.broker.ns.svc.cluster.local:7101",
                              extra=["--bind=0.0.0.0", "--metrics-port=9101"])
    assert argv == ["broker", "--id", "broker-2", "--data-dir", "/data/broker-2",
                    "--port", "7101", "--coordinator", "http://coordinator:7070",
                    "--advertise", "broker-2.broker.ns.svc.cluster.local:7101",
                    "--bind=0.0.0.0", "--metrics-port=9101"]


def test_probe_reports_what_is_wrong() -> None:
    port = closed_port()
    assert "refused" in (deploy.probe(f"127.0.0.1:{port}", 2) or "")
    assert "unreachable" in (deploy.probe(f"http://127.0.0.1:{port}", 2) or "")
    assert deploy.probe("127.0.0.1:notaport", 2) is not None
    code = CliRunner().invoke(app, ["deploy", "probe", f"127.0.0.1:{port}"]).exit_code
    assert code == 1


def test_probe_needs_an_answer_to_hello_not_just_a_listening_socket() -> None:
    with socket.socket() as silent:  # the kernel accepts; nobody answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        problem = deploy.probe(f"127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.5)
    assert problem is not None and "timed out" in problem
