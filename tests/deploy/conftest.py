"""Deploy fixtures: a cluster started the way deploy/ starts it, as processes or containers.

`deploy_cluster` is parametrized:

* `processes`: the coordinator and brokers as local processes (tests/conftest.py's
  `Proc`), brokers through `shardq deploy broker --claim` as in compose.
  Runs everywhere.
* `containers`: the image built from deploy/Dockerfile (testcontainers), a
  coordinator and brokers as containers on their own Docker network, the
  same commands as deploy/compose.yaml. Skipped, with the reason, where no
  Docker engine answers.

Both offer: `url` (coordinator, reachable from the test), `add_broker()`,
`shardq(broker_id, *args)` (run `shardq ...` where that broker runs: a
local process or `docker exec`), `stop(broker_id)` (SIGTERM, exit code) and
`api_host` (how brokers reach a server the test runs, e.g. a fake Kubernetes API).
"""

from __future__ import annotations

import gc
import itertools
import os
import subprocess
import sys
import uuid
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.conftest import Proc

from .kube import FakeKubeApi

REPO = Path(__file__).resolve().parents[2]
EXPECT = 3
# Tests move ~1/4 of 4096 slots; more handoffs at once keep them quick.
COORDINATOR_FLAGS = ["--expect", str(EXPECT), "--rebalance-concurrency", "8"]
CMD_TIMEOUT_S = 120.0


class DeployCluster(Protocol):
    kind: str
    url: str
    api_host: str

    def add_broker(self) -> str: ...
    def add_brokers(self, n: int) -> list[str]: ...
    def shardq(self, broker_id: str, *args: str) -> tuple[int, str]: ...
    def stop(self, broker_id: str) -> int: ...


class ProcessCluster:
    """Coordinator + brokers as local processes, started like deploy/compose.yaml starts them."""

    kind = "processes"
    api_host = "127.0.0.1"

    def __init__(self, procs: list[Proc], tmp_path: Path) -> None:
        self._procs = procs
        self._tmp = tmp_path
        coordinator = Proc(["coordinator", "--port", "0", "--data-dir", str(tmp_path / "coord"),
                            *COORDINATOR_FLAGS], log_path=tmp_path / "coordinator.log")
        procs.append(coordinator)
        self.url = f"http://{coordinator.addr}"
        self.brokers: dict[str, Proc] = {}
        self._seq = itertools.count(1)

    def add_broker(self) -> str:
        n = next(self._seq)
        id_file = self._tmp / f"broker-{n}.id"
        p = Proc(["deploy", "broker", "--claim", "--data-root", str(self._tmp / "data"),
                  "--coordinator", self.url, "--port", "0", "--id-file", str(id_file),
                  "--", "--bind", "127.0.0.1"],
                 log_path=self._tmp / f"broker-{n}.log")
        self._procs.append(p)
        broker_id = id_file.read_text().strip()
        self.brokers[broker_id] = p
        return broker_id

    def add_brokers(self, n: int) -> list[str]:
        """Start `n` brokers at once (they claim ids in whatever order they start)."""
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(lambda _: self.add_broker(), range(n)))

    def shardq(self, broker_id: str, *args: str) -> tuple[int, str]:
        r = subprocess.run([sys.executable, "-m", "shardq", *args], capture_output=True,
                           text=True, timeout=CMD_TIMEOUT_S,
                           env={**os.environ, "SHARDQ_COORDINATOR": self.url})
        return r.returncode, r.stdout + r.stderr

    def stop(self, broker_id: str) -> int:
        return self.brokers[broker_id].terminate(timeout=60)


class ContainerCluster:
    """Coordinator + brokers as containers of the deploy/Dockerfile image (compose's commands)."""

    kind = "containers"

    def __init__(self, image: str) -> None:
        from testcontainers.core.network import Network

        self._image = image
        self._network = Network().create()
        self._containers: list[Any] = []
        self.brokers: dict[str, Any] = {}
        self._volume = f"shardq-test-{uuid.uuid4().hex[:12]}"
        self.api_host = self._gateway()
        coordinator = self._start(
            ["coordinator", "--bind", "0.0.0.0", "--port", "7070", "--data-dir", "/data",
             *COORDINATOR_FLAGS],
            {"SHARDQ_PROBE_ADDR": "http://127.0.0.1:7070"}, aliases=["coordinator"])
        self.url = f"http://{self._ip(coordinator)}:7070"

    def add_broker(self) -> str:
        c = self._start(
            ["deploy", "broker", "--claim", "--data-root", "/data", "--port", "7101",
             "--advertise-host", "auto", "--", "--bind", "0.0.0.0"],
            {"SHARDQ_COORDINATOR": "http://coordinator:7070"}, volume=True)
        code, out = c.exec(["cat", "/tmp/shardq-broker-id"])
        assert code == 0, out
        broker_id = str(out.decode().strip())
        self.brokers[broker_id] = c
        return broker_id

    def add_brokers(self, n: int) -> list[str]:
        return [self.add_broker() for _ in range(n)]

    def shardq(self, broker_id: str, *args: str) -> tuple[int, str]:
        code, out = self.brokers[broker_id].exec(["shardq", *args])
        return int(code), out.decode(errors="replace")

    def stop(self, broker_id: str) -> int:
        wrapped = self.brokers[broker_id].get_wrapped_container()
        wrapped.stop(timeout=60)  # SIGTERM, as compose and the kubelet send it
        wrapped.reload()
        return int(wrapped.attrs["State"]["ExitCode"])

    def close(self) -> None:
        for c in self._containers:
            try:
                c.stop()
            except Exception as e:  # teardown goes on: every resource is removed
                print(f"could not stop a container: {e!r}", file=sys.stderr)
        try:
            self._network.remove()
        finally:
            import docker

            client = docker.from_env()
            try:
                client.volumes.get(self._volume).remove(force=True)
            except docker.errors.NotFound:
                pass
            finally:
                client.close()

    def _start(self, command: list[str], env: dict[str, str], aliases: list[str] | None = None,
               volume: bool = False) -> Any:
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.wait_strategies import LogMessageWaitStrategy

        ready = LogMessageWaitStrategy("READY").with_startup_timeout(60)
        c = (DockerContainer(self._image).with_command(command).with_network(self._network)
             .waiting_for(ready))
        for k, v in env.items():
            c = c.with_env(k, v)
        if aliases:
            c = c.with_network_aliases(*aliases)
        if volume:  # one named volume for all brokers, as in compose (ids are claimed in it)
            c = c.with_volume_mapping(self._volume, "/data", "rw")
        self._containers.append(c)
        c.start()  # returns once READY is logged
        return c

    def _ip(self, c: Any) -> str:
        wrapped = c.get_wrapped_container()
        wrapped.reload()
        return str(wrapped.attrs["NetworkSettings"]["Networks"][self._network.name]["IPAddress"])

    def _gateway(self) -> str:
        net = self._network._network  # the docker-py object
        net.reload()
        return str(net.attrs["IPAM"]["Config"][0]["Gateway"])


def docker_unavailable() -> str | None:
    """Why containers cannot run here, or None when a Docker engine answers."""
    if not os.environ.get("DOCKER_HOST") and not os.path.exists("/var/run/docker.sock"):
        return "no Docker engine reachable (no DOCKER_HOST, no /var/run/docker.sock)"
    # docker-py leaves its socket open when `from_env` fails; collect it here,
    # where its ResourceWarning is ours to drop, not the next test's error.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            import docker

            client = docker.from_env(timeout=5)
            try:
                client.ping()
            finally:
                client.close()
        except Exception as e:  # any failure to reach the engine means: skip
            return f"no Docker engine reachable ({type(e).__name__}: {str(e)[:120]})"
        finally:
            gc.collect()
    return None


@pytest.fixture(scope="session")
def shardq_image() -> Iterator[str]:
    """The image built from deploy/Dockerfile (repository root as context), removed at the end."""
    reason = docker_unavailable()
    if reason is not None:
        pytest.skip(reason)
    from testcontainers.core.image import DockerImage

    with DockerImage(path=REPO, dockerfile_path="deploy/Dockerfile",
                     tag=f"shardq:test-{uuid.uuid4().hex[:8]}") as image:
        yield str(image)


@pytest.fixture(params=["processes", "containers"])
def deploy_cluster(request: pytest.FixtureRequest, procs: list[Proc],
                   tmp_path: Path) -> Iterator[DeployCluster]:
    """A coordinator (`--expect 3`) and three brokers, as processes or as containers."""
    if request.param == "processes":
        cluster: DeployCluster = ProcessCluster(procs, tmp_path)
        closer = None
    else:
        image = request.getfixturevalue("shardq_image")
        containers = ContainerCluster(image)
        cluster, closer = containers, containers.close
    try:
        cluster.add_brokers(EXPECT)
        yield cluster
    finally:
        if closer is not None:
            closer()


@pytest.fixture
def kube_api(deploy_cluster: DeployCluster) -> Iterator[FakeKubeApi]:
    """A fake Kubernetes API the brokers' preStop hook can reach."""
    api = FakeKubeApi(bind="127.0.0.1" if deploy_cluster.kind == "processes" else "0.0.0.0")
    yield api
    api.close()
