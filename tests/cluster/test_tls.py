"""TLS on every listener and link (README "Security and limits"): a
coordinator and two brokers with `shardq dev-certs` certificates, mutual TLS
for control connections, the coordinator told apart by its certificate."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import shardq
from shardq import protocol
from shardq.client.connection import open_connection
from shardq.client.retry import RetryPolicy
from shardq.devcerts import make_dev_certs
from shardq.router import Topology
from shardq.tls import client_context
from tests.aio import run, running

from ..conftest import Proc

pytestmark = pytest.mark.slow

CLIENT, CONTROL = "tls-client-token", "tls-control-token"
BROKERS = ("b1", "b2")


@dataclass
class TlsCluster:
    url: str
    certs: Path
    brokers: dict[str, Proc]

    @property
    def ca(self) -> str:
        return str(self.certs / "ca.pem")

    def ctx(self, cert: str | None = None) -> ssl.SSLContext:
        """A client context trusting the dev CA, presenting `cert` (a stem)."""
        if cert is None:
            return client_context(self.ca)
        return client_context(self.ca, self.certs / f"{cert}.pem", self.certs / f"{cert}.key")

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, verify=self.ctx(), timeout=10,
                                 headers={"Authorization": f"Bearer {CONTROL}"})


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    make_dev_certs(out)
    return out


def start_tls_cluster(procs: list[Proc], tmp_path: Path, certs: Path,
                      brokers: tuple[str, ...] = BROKERS, *coordinator_extra: str) -> TlsCluster:
    """A TLS coordinator and brokers (mutual TLS on control), serving."""
    control = tmp_path / "control.token"
    control.write_text(CONTROL + "\n")
    tokens = ["--token", CLIENT, "--control-token-file", str(control)]
    ca = str(certs / "ca.pem")
    coord = Proc(["coordinator", "--port", "0", "--data-dir", str(tmp_path / "coord"),
                  "--expect", str(len(brokers)), *tokens, "--ssl-ca", ca,
                  "--ssl-cert", str(certs / "coordinator.pem"),
                  "--ssl-key", str(certs / "coordinator.key"), *coordinator_extra],
                 log_path=tmp_path / "coordinator.log")
    procs.append(coord)
    url = f"https://{coord.addr}"
    started = {}
    for b in brokers:
        started[b] = Proc(["broker", "--id", b, "--port", "0", "--data-dir", str(tmp_path / b),
                           "--coordinator", url, *tokens, "--ssl-ca", ca,
                           "--ssl-cert", str(certs / "broker.pem"),
                           "--ssl-key", str(certs / "broker.key"), "--ssl-client-ca", ca],
                          log_path=tmp_path / f"{b}.log")
        procs.append(started[b])
    c = TlsCluster(url, certs, started)
    run(_serving(c, brokers))
    return c


@pytest.fixture
def tls_cluster(procs: list[Proc], tmp_path: Path, certs: Path) -> Iterator[TlsCluster]:
    yield start_tls_cluster(procs, tmp_path, certs)


async def _topology(c: TlsCluster) -> Topology:
    async with c.http() as http:
        return Topology.from_dict((await http.get("/topology")).json())


async def _serving(c: TlsCluster, brokers: tuple[str, ...] = BROKERS) -> None:
    """Until every broker owns slots and serves the coordinator's epoch."""
    async with asyncio.timeout(60):
        while True:
            topo = await _topology(c)
            counts = topo.slot_counts()
            if all(counts.get(b, 0) > 0 for b in brokers):
                epochs = []
                for b in brokers:
                    conn = await open_connection(topo.brokers[b].addr, token=CLIENT,
                                                 ssl_context=c.ctx())
                    epochs.append(conn.max_epoch)
                    await conn.aclose()
                if all(e == topo.epoch for e in epochs):
                    return
            await asyncio.sleep(0.05)


def test_a_client_with_the_ca_adds_and_works_jobs_and_a_queue_moves_over_tls(
        tls_cluster: TlsCluster) -> None:
    c = tls_cluster

    async def main() -> None:
        async with await shardq.connect(c.url, CLIENT, ssl_ca=c.ca) as client:
            q = client.queue("tls-q")
            done: set[str] = set()
            all_done = asyncio.Event()

            async def handle(job: shardq.Job) -> None:
                done.add(job.id)
                if len(done) == 40:
                    all_done.set()

            for i in range(20):
                await q.add("n", {"i": i}, job_id=f"a{i}")
            # A move is the coordinator's handoff ops (mutual TLS, its CN) and
            # the snapshot copy from broker to broker (TLS both ways).
            owner = (await _topology(c)).owner_of("tls-q")
            to = "b2" if owner == "b1" else "b1"
            async with c.http() as http:
                r = await http.post("/queues/tls-q/move", json={"to": to})
                assert r.status_code == 200, r.text
                async with asyncio.timeout(60):
                    while True:
                        topo = await _topology(c)
                        if topo.owner_of("tls-q") == to and not topo.moving:
                            break
                        await asyncio.sleep(0.05)
            for i in range(20):
                await q.add("n", {"i": i}, job_id=f"b{i}")
            async with running(client.worker("tls-q", handle, concurrency=4)):
                await asyncio.wait_for(all_done.wait(), 60)
            assert done == {f"a{i}" for i in range(20)} | {f"b{i}" for i in range(20)}

    run(main())


def test_a_client_without_the_ca_or_without_tls_fails_with_a_clear_error(
        tls_cluster: TlsCluster, procs: list[Proc], tmp_path: Path) -> None:
    c = tls_cluster
    other = tmp_path / "other-ca"
    make_dev_certs(other)  # a CA that signed nothing the cluster presents
    addr = next(iter(c.brokers.values())).addr
    quick = RetryPolicy(unavailable_budget=1.0)
    plain = Proc(["broker", "--id", "plain", "--port", "0", "--data-dir", str(tmp_path / "plain")],
                 log_path=tmp_path / "plain.log")
    procs.append(plain)

    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(shardq.TlsError, match="CERTIFICATE_VERIFY_FAILED"):
            await shardq.connect(c.url, CLIENT, ssl_ca=str(other / "ca.pem"))
        with pytest.raises(shardq.TlsError, match="CERTIFICATE_VERIFY_FAILED"):
            await shardq.connect(addr, CLIENT, ssl_ca=str(other / "ca.pem"))
        # Not retried: a failed handshake cannot get better.
        assert time.monotonic() - started < 5
        # Cleartext to a TLS broker: the broker drops the connection at once;
        # the client tells that from a dying broker, and does not retry.
        started = time.monotonic()
        with pytest.raises(shardq.TlsError, match=r"speaks TLS.*ssl_ca"):
            await shardq.connect(addr, CLIENT)
        assert time.monotonic() - started < 5
        # The coordinator's URL as http: a cleartext request to a TLS listener.
        with pytest.raises(shardq.UnavailableError):
            await shardq.connect(c.url.replace("https://", "http://"), CLIENT, policy=quick)
        # TLS to a cleartext broker: its answer is no TLS record.
        with pytest.raises(shardq.TlsError):
            await shardq.connect(plain.addr, ssl_ca=c.ca, policy=quick)

    run(main())


def test_a_control_connection_needs_a_client_cert_and_term_ops_the_coordinators(
        tls_cluster: TlsCluster) -> None:
    c = tls_cluster
    addr = next(iter(c.brokers.values())).addr

    async def main() -> None:
        async with c.http() as http:
            term = (await http.get("/healthz")).json()["term"]
        # The control token without a client certificate: refused at HELLO.
        with pytest.raises(shardq.AuthError, match="client certificate"):
            await open_connection(addr, token=CONTROL, ssl_context=c.ctx())
        # A client token needs no certificate.
        conn = await open_connection(addr, token=CLIENT, ssl_context=c.ctx())
        await conn.aclose()
        # A broker's certificate and the control token: control, not the
        # coordinator; a higher term is refused and changes nothing.
        conn = await open_connection(addr, token=CONTROL, ssl_context=c.ctx("broker"))
        try:
            for op in (protocol.HANDOFF_ABORT, protocol.HANDOFF_PREPARE, protocol.REPL_PROMOTE):
                with pytest.raises(shardq.AuthError, match="coordinator"):
                    await conn.request(op, {"move_id": "evil", "term": 10**12})
            assert await conn.request(protocol.PING, {}) == "pong"
        finally:
            await conn.aclose()
        # The coordinator's certificate may, at the coordinator's term: a
        # broker that had taken 10**12 would answer STALE_TERM.
        conn = await open_connection(addr, token=CONTROL, ssl_context=c.ctx("coordinator"))
        try:
            reply = await conn.request(protocol.HANDOFF_ABORT,
                                       {"move_id": "nothing", "term": term})
            assert reply == {"aborted": True}
        finally:
            await conn.aclose()

    run(main())


def test_cluster_up_passes_tls_options_to_every_child(
        procs: list[Proc], tmp_path: Path, certs: Path) -> None:
    ca = str(certs / "ca.pem")
    sup = Proc(["cluster", "up", "-n", "2", "--data-dir", str(tmp_path / "data"),
                "--coordinator-port", "0", "--base-port", "0", "--ssl-ca", ca,
                "--ssl-cert", str(certs / "broker.pem"), "--ssl-key", str(certs / "broker.key"),
                "--ssl-client-ca", ca, "--ssl-coordinator-cert", str(certs / "coordinator.pem"),
                "--ssl-coordinator-key", str(certs / "coordinator.key")],
               env={"SHARDQ_TOKEN": CLIENT}, log_path=tmp_path / "supervisor.log")
    procs.append(sup)
    assert sup.addr.startswith("https://")
    assert (tmp_path / "data" / "secrets" / "coordinator.token").exists()

    async def main() -> None:
        async with await shardq.connect(sup.addr, CLIENT, ssl_ca=ca) as client:
            q = client.queue("up-tls")
            await q.add("n", {}, job_id="j1")
            job = await q.get_job("j1")
            assert job is not None and job["id"] == "j1"
            # An admin command over HTTPS (SHARDQ_SSL_CA): a move, i.e. the
            # coordinator's handoff ops and a broker-to-broker copy under mTLS.
            owner = client._cluster.topology.route("up-tls")
            assert owner is not None
            to = "b2" if owner[0] == "b1" else "b1"
            control = (tmp_path / "data" / "secrets" / "control.token").read_text().strip()
            env = {**os.environ, "SHARDQ_SSL_CA": ca, "SHARDQ_CONTROL_TOKEN": control}
            moved = subprocess.run([sys.executable, "-m", "shardq", "move", "up-tls", "--to", to,
                                    "--coordinator", sup.addr, "--json"],
                                   env=env, capture_output=True, text=True, timeout=60)
            assert moved.returncode == 0, moved.stdout + moved.stderr
            assert await q.get_job("j1") is not None
        with pytest.raises(shardq.TlsError):
            await shardq.connect(sup.addr, CLIENT)  # the system CAs do not know the dev CA

    run(main())


def test_replication_and_a_failover_run_over_tls_with_the_coordinators_certificate(
        procs: list[Proc], tmp_path: Path, certs: Path) -> None:
    three = ("b1", "b2", "b3")
    c = start_tls_cluster(procs, tmp_path, certs, three, "--replicas", "1",
                          "--heartbeat-timeout-ms", "1000")

    async def main() -> None:
        async with c.http() as http:
            async with asyncio.timeout(60):  # every primary's follower has its copy
                while True:
                    rep = (await http.get("/replication")).json()
                    if all(rep.get(b, {}).get("in_sync") for b in three):
                        break
                    await asyncio.sleep(0.1)
        topo = await _topology(c)
        victim = "b2"
        follower = rep[victim]["follower"]
        queue = next(f"fo-{i}" for i in range(10_000) if topo.owner_of(f"fo-{i}") == victim)
        async with await shardq.connect(c.url, CLIENT, ssl_ca=c.ca) as client:
            q = client.queue(queue)
            for i in range(20):
                await q.add("n", {"i": i}, job_id=f"j{i}")
            c.brokers[victim].kill()
            # The coordinator fences and promotes the follower (REPL_FENCE and
            # REPL_PROMOTE: its certificate's ops) and the client follows.
            async with asyncio.timeout(60):
                while (await _topology(c)).owner_of(queue) != follower:
                    await asyncio.sleep(0.1)
            await q.add("n", {}, job_id="after")
            counts = await q.counts()
            assert counts["waiting"] == 21, counts

    run(main())
