"""deploy/ validated offline: Kubernetes schemas, the compose spec, and the contracts between
the files (names, ports, selectors, probes, the preStop budget, the CLI flags they use)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kv
from typer.testing import CliRunner

from shardq.cli import app

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
# The oldest and newest Kubernetes minors kubernetes-validate ships schemas for (offline).
K8S_VERSIONS = ["1.30.0", "1.37.0"]
POD = {"POD_NAME": "broker-2", "POD_NAMESPACE": "shardq"}


def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        out += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def resources() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for _, d in k8s_docs()
            if d["kind"] != "Kustomization"}


def container(kind: str, name: str) -> dict[str, Any]:
    spec = resources()[(kind, name)]["spec"]["template"]["spec"]
    c: dict[str, Any] = spec["containers"][0]
    return c


def flag(args: list[str], name: str) -> str:
    """The value of `--name=value` (or `--name value`) in a command line."""
    for i, a in enumerate(args):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}":
            return args[i + 1]
    raise AssertionError(f"--{name} not in {args}")


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)


def assert_cli_accepts(args: list[str]) -> None:
    """The real `shardq` CLI knows every option in `args` (`--help` stops before running)."""
    cmd, extra = (args, []) if "--" not in args else (
        args[:args.index("--")], args[args.index("--") + 1:])
    words = [a for a in cmd if not a.startswith("-")][:2]
    path = words if words[:1] == ["deploy"] else words[:1]
    res = CliRunner().invoke(app, [*path, "--help", *cmd[len(path):]])
    assert res.exit_code == 0, f"shardq rejects {cmd}: {res.output[-400:]}"
    if extra:  # what the wrapper passes on to `shardq broker`
        res = CliRunner().invoke(app, ["broker", "--help", *extra])
        assert res.exit_code == 0, f"shardq broker rejects {extra}: {res.output[-400:]}"


# -- Kubernetes ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_kubernetes_manifest_validates_against_the_strict_schema(version: str) -> None:
    docs = [(f, d) for f, d in k8s_docs() if d["kind"] != "Kustomization"]
    assert {d["kind"] for _, d in docs} >= {
        "StatefulSet", "Service", "Deployment", "PersistentVolumeClaim", "PodDisruptionBudget",
        "ServiceAccount", "Role", "RoleBinding"}
    for name, doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']}: {e}")


def test_the_validator_does_reject_a_misspelt_field() -> None:
    sts = json.loads(json.dumps(resources()[("StatefulSet", "broker")]))
    sts["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStp"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(sts, K8S_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert [i["name"] for i in kust["images"]] == ["shardq"]


def test_brokers_are_a_statefulset_with_a_headless_service_and_a_volume_each() -> None:
    res = resources()
    sts = res[("StatefulSet", "broker")]["spec"]
    svc = res[("Service", sts["serviceName"])]["spec"]
    assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is True
    labels = sts["template"]["metadata"]["labels"]
    assert svc["selector"] == labels == sts["selector"]["matchLabels"]
    [claim] = sts["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container("StatefulSet", "broker")["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/data"
    assert sts["podManagementPolicy"] == "OrderedReady"  # scale in: one pod at a time


def test_broker_id_and_advertised_address_come_from_the_pod() -> None:
    c = container("StatefulSet", "broker")
    sts = resources()[("StatefulSet", "broker")]["spec"]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    args = [expand(a, POD) for a in c["args"]]
    assert args[:2] == ["deploy", "broker"]
    assert flag(args, "id") == "broker-2"
    port = int(flag(args, "port"))
    assert flag(args, "advertise-host") == f"broker-2.{sts['serviceName']}.shardq.svc.cluster.local"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["wire"] == port
    extra = args[args.index("--") + 1:]
    assert flag(extra, "bind") == "0.0.0.0"
    assert int(flag(extra, "metrics-port")) == ports["metrics"]
    assert_cli_accepts(args)


def test_prestop_drains_within_the_grace_period_and_probes_watch_the_broker() -> None:
    c = container("StatefulSet", "broker")
    pod = resources()[("StatefulSet", "broker")]["spec"]["template"]["spec"]
    hook = c["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[:3] == ["shardq", "deploy", "prestop"]
    assert float(flag(hook, "timeout")) + 20 <= pod["terminationGracePeriodSeconds"]
    assert_cli_accepts(hook[1:])
    wire = next(p for p in c["ports"] if p["name"] == "wire")["containerPort"]
    assert c["readinessProbe"]["tcpSocket"]["port"] == "wire"
    live = c["livenessProbe"]["exec"]["command"]
    assert live == ["shardq", "deploy", "probe", f"127.0.0.1:{wire}"]
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 120
    env = {e["name"]: e.get("value") for e in c["env"]}
    coord = env["SHARDQ_COORDINATOR"]  # the hook finds the coordinator through it
    svc = resources()[("Service", "coordinator")]["spec"]
    assert coord == f"http://coordinator:{svc['ports'][0]['port']}"


def test_prestop_may_read_the_statefulset_and_nothing_else() -> None:
    res = resources()
    pod = res[("StatefulSet", "broker")]["spec"]["template"]["spec"]
    sa = pod["serviceAccountName"]
    assert ("ServiceAccount", sa) in res
    binding = next(d for (k, _), d in res.items() if k == "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa}]
    role = res[("Role", binding["roleRef"]["name"])]
    assert role["rules"] == [{"apiGroups": ["apps"], "resources": ["statefulsets"],
                              "resourceNames": ["broker"], "verbs": ["get"]}]


def test_disruption_budget_covers_the_brokers_one_at_a_time() -> None:
    res = resources()
    pdb = res[("PodDisruptionBudget", "broker")]["spec"]
    labels = res[("StatefulSet", "broker")]["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"] == labels
    assert pdb["maxUnavailable"] == 1


def test_coordinator_is_one_instance_scraped_by_prometheus() -> None:
    res = resources()
    dep = res[("Deployment", "coordinator")]["spec"]
    assert dep["replicas"] == 1 and dep["strategy"]["type"] == "Recreate"
    c = container("Deployment", "coordinator")
    port = next(p for p in c["ports"] if p["name"] == "http")["containerPort"]
    assert int(flag(c["args"], "port")) == port
    for meta in (dep["template"]["metadata"], res[("Service", "coordinator")]["metadata"]):
        ann = meta["annotations"]
        assert ann["prometheus.io/scrape"] == "true"
        assert ann["prometheus.io/port"] == str(port) and ann["prometheus.io/path"] == "/metrics"
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    expect = int(flag(c["args"], "expect"))
    assert expect == res[("StatefulSet", "broker")]["spec"]["replicas"]
    volumes = {v["name"]: v for v in dep["template"]["spec"]["volumes"]}
    claim = volumes["data"]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in res
    assert_cli_accepts(c["args"])


def test_pods_run_as_the_images_unprivileged_user() -> None:
    uid = int(re.search(r"^USER (\d+)", (DEPLOY / "Dockerfile").read_text(), re.M)[1])
    for kind, name in (("StatefulSet", "broker"), ("Deployment", "coordinator")):
        sc = resources()[(kind, name)]["spec"]["template"]["spec"]["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == uid and sc["fsGroup"] == uid


# -- compose ------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return doc


def compose_schema() -> dict[str, Any]:
    # check-jsonschema vendors the compose-spec schema (its `vendor.compose-spec`).
    text = (files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def test_compose_file_validates_against_the_compose_spec() -> None:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose())]
    assert errors == []
    bad = compose()
    bad["services"]["broker"]["stop_grace_priod"] = "30s"
    assert list(validator.iter_errors(bad)), "the schema must reject a misspelt key"


def test_compose_brokers_scale_and_every_command_parses() -> None:
    doc = compose()
    broker, coord = doc["services"]["broker"], doc["services"]["coordinator"]
    # `--scale broker=N` needs no fixed name and no host port per broker.
    assert "container_name" not in broker and "ports" not in broker
    assert int(flag(coord["command"], "expect")) == broker["deploy"]["replicas"]
    assert broker["environment"]["SHARDQ_COORDINATOR"] == "http://coordinator:7070"
    assert "--claim" in broker["command"]
    assert broker["volumes"][0].split(":")[0] in doc["volumes"]
    assert broker["depends_on"]["coordinator"]["condition"] == "service_healthy"
    assert coord["healthcheck"]["test"] == ["CMD", "shardq", "deploy", "probe"]
    assert coord["environment"]["SHARDQ_PROBE_ADDR"] == "http://127.0.0.1:7070"
    for service in (broker, coord):
        assert_cli_accepts(service["command"])


# -- Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_is_slim_unprivileged_with_a_healthcheck_and_the_shardq_entrypoint() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M)
    assert re.search(r"^USER 10001", text, re.M)
    assert re.search(r'^ENTRYPOINT \["shardq"\]$', text, re.M)
    health = re.search(r"^HEALTHCHECK .*\n\s+CMD (.*)$", text, re.M)
    assert health and json.loads(health[1]) == ["shardq", "deploy", "probe"]
    assert "pip install /tmp/*.whl" in text  # the wheel, not the source tree


def dockerfile_copies() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    out = []
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            out += shlex.split(line)[1:-1]
    return out


def test_dockerfile_copies_every_folder_the_package_is_built_from() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    folders = {d.split("/")[0] for d in pyproject["tool"]["setuptools"]["package-dir"].values()}
    copied = set(dockerfile_copies())
    assert folders <= copied, f"not copied into the image: {folders - copied}"
    assert {"pyproject.toml", "README.md"} <= copied
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert not ignored & copied


def test_the_dockerfiles_build_context_makes_a_complete_wheel(tmp_path: Path) -> None:
    """What `pip wheel` does in the image's build stage, on the files it copies (offline)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in dockerfile_copies():
        subprocess.run(["cp", "-r", str(REPO / name), str(src / name)], check=True)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"),
                        str(src)], capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("shardq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("shardq/deploy.py", "shardq/cli/deploy_cmd.py", "shardq/broker/server.py",
                   "shardq/coordinator/app.py", "shardq/router/ring.py",
                   "shardq/client/client.py"):
        assert module in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "shardq = shardq.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_the_deployments_run_replicated_and_kubernetes_brokers_send_their_zone() -> None:
    coord = container("Deployment", "coordinator")
    assert flag(coord["args"], "replicas") == "1"
    assert flag(compose()["services"]["coordinator"]["command"], "replicas") == "1"
    env = {e["name"]: e for e in container("StatefulSet", "broker")["env"]}
    field = env["SHARDQ_ZONE"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field == "metadata.labels['topology.kubernetes.io/zone']"
    spread = resources()[("StatefulSet", "broker")]["spec"]["template"]["spec"]["affinity"]
    keys = {t["podAffinityTerm"]["topologyKey"]
            for t in spread["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]}
    assert "topology.kubernetes.io/zone" in keys
    # The broker command reads the variable (an empty one is no zone).
    res = CliRunner().invoke(app, ["broker", "--help"])
    assert "SHARDQ_ZONE" in res.output
