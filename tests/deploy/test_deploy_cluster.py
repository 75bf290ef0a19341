"""A cluster started the way deploy/ starts it: scale out by registration, scale in by the
Kubernetes preStop hook, and every job pushed before completes exactly once.

Runs on local processes everywhere and, where a Docker engine answers, on
containers of the deploy/Dockerfile image (tests/deploy/conftest.py). The
Kubernetes API is a fake that only answers `spec.replicas`; the coordinator
and brokers are real.
"""

from __future__ import annotations

import time

import pytest

from shardq import deploy
from tests.aio import run
from tests.cluster.conftest import http_get, poll, synced_topology

from .conftest import DeployCluster
from .kube import NAMESPACE, FakeKubeApi
from .workload import push, serving, slots_by_broker, work

pytestmark = pytest.mark.slow


def prestop(c: DeployCluster, kube: FakeKubeApi, broker_id: str, pod: str) -> tuple[int, str]:
    """The preStop hook as the kubelet runs it in pod `pod` (whose broker is `broker_id`)."""
    return c.shardq(broker_id, "deploy", "prestop", "--pod", pod, "--id", broker_id,
                    "--k8s-api", kube.url(c.api_host), "--namespace", NAMESPACE,
                    "--service-account-dir", "/nonexistent", "--timeout", "60")


def test_scale_out_then_in_by_prestop_keeps_every_job_exactly_once(
        deploy_cluster: DeployCluster, kube_api: FakeKubeApi) -> None:
    c = deploy_cluster
    first = {"b1", "b2", "b3"}
    poll(lambda: serving(c.url, first), "bootstrap of b1..b3")
    # every broker serves the coordinator's map (so no TRYAGAIN wait below)
    topo = synced_topology(c.url, tuple(sorted(first)))
    for bid in first:  # every broker answers HELLO at its advertised address
        assert deploy.probe(topo.brokers[bid].addr) is None
        if c.kind == "containers":  # and the image's HEALTHCHECK passes inside it
            assert c.shardq(bid, "deploy", "probe")[0] == 0
    assert deploy.probe(c.url) is None
    pushed = run(push(c.url))

    # Scale out: a 4th broker registers and the coordinator rebalances onto it.
    b4 = c.add_broker()
    assert b4 == "b4"
    poll(lambda: serving(c.url, first | {b4}), "the rebalance onto b4")

    # A rolling restart of broker-1 (4 replicas wanted): the hook keeps its slots.
    kube_api.replicas = 4
    before = http_get(c.url, "/topology")
    code, out = prestop(c, kube_api, "b2", "broker-1")
    assert code == 0 and "keep (ordinal 1, broker wants 4 replicas)" in out, out
    assert http_get(c.url, "/topology") == before, "a restart moved nothing"

    # kubectl scale statefulset broker --replicas=3: broker-3 (b4) drains first.
    kube_api.replicas = 3
    started = time.monotonic()
    code, out = prestop(c, kube_api, b4, "broker-3")
    assert code == 0 and "drain (ordinal 3, broker wants 3 replicas)" in out, out
    rows = slots_by_broker(c.url)
    assert rows is not None and rows[b4] == ("drained", 0)
    assert sum(slots for _, slots in rows.values()) == 4096
    assert c.stop(b4) == 0  # then SIGTERM: nothing left to drain, a clean exit
    assert time.monotonic() - started < 60

    handled, totals = run(work(c.url, len(pushed)))
    assert set(handled) == pushed
    assert max(handled.values()) == 1, "a job ran twice"
    assert totals["completed"] == len(pushed) and totals["waiting"] == totals["active"] == 0

    # Scaled out again (kubectl scale --replicas=4): the same id comes back on its
    # volume, its drained entry is cleared and it joins afresh, getting slots.
    assert c.add_broker() == b4
    poll(lambda: (slots_by_broker(c.url) or {}).get(b4, ("", 0))[1] > 0,
         "b4 to get slots again after its scale in")


def test_the_image_builds_runs_shardq_as_an_unprivileged_user_with_a_healthcheck(
        shardq_image: str) -> None:
    import docker

    client = docker.from_env()
    try:
        config = client.images.get(shardq_image).attrs["Config"]
        assert config["User"] == "10001:10001"
        assert config["Entrypoint"] == ["shardq"]
        assert config["Healthcheck"]["Test"] == ["CMD", "shardq", "deploy", "probe"]
        out = client.containers.run(shardq_image, ["deploy", "--help"], remove=True)
        assert b"prestop" in out and b"probe" in out
    finally:
        client.close()
