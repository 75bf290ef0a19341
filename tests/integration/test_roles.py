"""Client and control roles: a client token can never send handoff or term
ops; tokens come from files or the environment (README "Security")."""

from __future__ import annotations

from pathlib import Path

import httpx

import shardq
from tests.aio import run
from tests.integration.rawwire import RawConn, add_args
from tests.integration.test_coordinator_http import start_coordinator

CLIENT, CONTROL = "client-s3cret", "control-s3cret"


def _hello(addr: str, token: str) -> tuple[RawConn, dict]:  # type: ignore[type-arg]
    c = RawConn(addr, hello=False)
    reply = c.call("HELLO", {"version": 1, "token": token})
    assert reply[1] == "ok", reply
    return c, reply[2]


def test_a_client_token_cannot_send_term_ops_and_changes_nothing(
        start_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    token_file = tmp_path / "client.token"
    token_file.write_text(CLIENT + "\n")
    b = start_broker("b1", "--token-file", str(token_file),
                     env={"SHARDQ_CONTROL_TOKEN": CONTROL})
    client, hello = _hello(b.addr, CLIENT)
    assert hello["role"] == "client"
    # The probe: a higher term from a client connection.
    reply = client.call("HANDOFF_ABORT", {"move_id": "evil", "term": 10**12})
    assert reply[1] == "AUTH" and "control" in reply[2]
    for op in ("HANDOFF_PREPARE", "HANDOFF_FREEZE", "IMPORT_OPS", "FLOW_CHILD_DONE"):
        assert client.call(op, {"move_id": "evil", "term": 10**12})[1] == "AUTH"
    assert client.ok("ADD", add_args("q", "j1")) == ["j1"]  # data ops are unaffected
    # Nothing changed: the control role still works at a low term, which a
    # broker that had taken term 10**12 would refuse (STALE_TERM).
    control, hello = _hello(b.addr, CONTROL)
    assert hello["role"] == "control"
    assert control.ok("HANDOFF_ABORT", {"move_id": "m1", "term": 5}) == {"aborted": True}
    assert control.call("HANDOFF_ABORT", {"move_id": "m2", "term": 4})[1] == "STALE_TERM"
    # And the client token is not the control token.
    assert RawConn(b.addr, hello=False).call(
        "HELLO", {"version": 1, "token": "nope"})[1] == "AUTH"


def test_with_a_coordinator_token_another_control_peer_cannot_send_term_ops(
        start_broker) -> None:  # type: ignore[no-untyped-def]
    coordinator = "coordinator-s3cret"
    b = start_broker("b1", env={"SHARDQ_TOKEN": CLIENT, "SHARDQ_CONTROL_TOKEN": CONTROL,
                                "SHARDQ_COORDINATOR_TOKEN": coordinator})
    peer, hello = _hello(b.addr, CONTROL)  # what another broker sends
    assert hello["role"] == "control"
    for op in ("HANDOFF_ABORT", "HANDOFF_PREPARE", "HANDOFF_ACTIVATE", "REPL_FENCE",
               "REPL_PROMOTE"):
        reply = peer.call(op, {"move_id": "evil", "term": 10**12})
        assert reply[1] == "AUTH" and "coordinator" in reply[2], (op, reply)
    # Broker-to-broker ops stay open to it (refused for their arguments only).
    assert peer.call("IMPORT_OPS", {"move_id": "none", "ops": []})[1] != "AUTH"
    # Nothing changed: the coordinator's connection still works at a low term.
    coord, hello = _hello(b.addr, coordinator)
    assert hello["role"] == "coordinator"
    assert coord.ok("HANDOFF_ABORT", {"move_id": "m1", "term": 5}) == {"aborted": True}
    assert coord.call("HANDOFF_ABORT", {"move_id": "m2", "term": 4})[1] == "STALE_TERM"


def test_without_a_control_token_the_client_token_keeps_both_roles(start_broker) -> None:  # type: ignore[no-untyped-def]
    b = start_broker("b1", env={"SHARDQ_TOKEN": CLIENT})
    _, hello = _hello(b.addr, CLIENT)
    assert hello["role"] == "control"


def test_an_unreadable_token_file_is_a_clear_error(start_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "shardq", "broker", "--id", "b1", "--port", "0",
                        "--data-dir", str(tmp_path / "d"), "--token-file",
                        str(tmp_path / "missing")], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "cannot read token file" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_coordinator_lets_the_client_token_read_and_only_control_change(
        procs, start_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    control_file = tmp_path / "control.token"
    control_file.write_text(CONTROL)
    coord = start_coordinator(procs, tmp_path, "--token", CLIENT,
                              "--control-token-file", str(control_file))
    url = f"http://{coord.addr}"
    # A broker registers and is handed slots over control connections.
    start_broker("b1", "--coordinator", url, "--token", CLIENT,
                 "--control-token-file", str(control_file))

    def as_(token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}

    assert httpx.get(f"{url}/topology", headers=as_(CLIENT), timeout=5).status_code == 200
    assert httpx.get(f"{url}/topology", headers=as_(None), timeout=5).status_code == 401
    r = httpx.post(f"{url}/brokers/b1/forget", json={}, headers=as_(CLIENT), timeout=5)
    assert r.status_code == 403 and "control token" in r.json()["error"]
    r = httpx.post(f"{url}/brokers/b9/forget", json={}, headers=as_(CONTROL), timeout=5)
    assert r.status_code not in (401, 403)

    async def main() -> None:
        async with await shardq.connect(url, CLIENT) as client:
            q = client.queue("q")
            await q.add("n", {}, job_id="j1")
            assert (await q.counts())["waiting"] == 1

    run(main())
