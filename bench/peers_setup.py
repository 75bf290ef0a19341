"""Installing the peers on first use, and starting their servers (loopback only).

  * redis-server: Debian's package (`apt-get install -y redis-server`), installed by the bench
    when missing and it runs as root; started per run on a free port with no persistence
    (`--save "" --appendonly no`) or with AOF everysec (`--appendonly yes --appendfsync
    everysec`), `maxmemory-policy noeviction` as BullMQ's production guide requires.
  * BullMQ (Node), bun and bunqueue: npm packages pinned in bench/peers/package.json and
    package-lock.json, installed with `npm ci` into bench/peers/node_modules (gitignored).
  * BullMQ (Python): pip `bullmq` pinned in bench/peers/requirements-bullmq-python.txt, in its
    own venv bench/peers/pyvenv (it pins croniter/msgpack versions unlike shardq's).
  * shardq's own Node client (clients/node): `npm ci` from its lockfile and `npm run build`
    when dist/ is missing or older than its sources.
  * bunqueue server: `bunqueue start` on bun, in memory (no --data-path) or SQLite
    (--data-path), which is how its README runs the TCP server.

A peer that cannot be installed is skipped with the reason; its numbers are never made up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchlib import BENCH, Proc, console, free_port, wait_port

PEERS = BENCH / "peers"
NODE_MODULES = PEERS / "node_modules"
BUN = NODE_MODULES / ".bin" / "bun"
PYVENV = PEERS / "pyvenv"
PYVENV_PY = PYVENV / "bin" / "python"


class PeerUnavailable(Exception):
    """The peer cannot be installed or started here; the message says why."""


def _run(argv: list[str], what: str, cwd: Path | None = None, timeout: float = 900) -> None:
    console.print(f"[cyan]bench:[/cyan] {what}: {' '.join(argv)}")
    try:
        r = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PeerUnavailable(f"{what} failed: {e}") from None
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).decode(errors="replace")[-800:]
        raise PeerUnavailable(f"{what} failed (exit {r.returncode}): {tail}")


def ensure_redis() -> str:
    """Path of redis-server; installs Debian's package when missing (as root)."""
    path = shutil.which("redis-server")
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise PeerUnavailable("redis-server is not installed and the bench cannot apt-get it "
                              "(not root or no apt-get): `apt-get install -y redis-server`")
    console.print("[yellow]bench:[/yellow] redis-server is missing; installing Debian's "
                  "package redis-server")
    _run(["apt-get", "update", "-qq"], "apt-get update")
    _run(["apt-get", "install", "-y", "-qq", "redis-server"], "install redis-server")
    path = shutil.which("redis-server")
    if not path:
        raise PeerUnavailable("redis-server still missing after apt-get install")
    return path


def ensure_node_peers() -> None:
    """bench/peers/node_modules with bullmq, bun and bunqueue (npm ci on first use)."""
    if not shutil.which("node") or not shutil.which("npm"):
        raise PeerUnavailable("Node.js/npm not found: BullMQ (Node) and bunqueue need them")
    marker = NODE_MODULES / ".package-lock.json"
    lock = PEERS / "package-lock.json"
    if marker.exists() and marker.stat().st_mtime >= lock.stat().st_mtime and BUN.exists():
        return
    console.print("[yellow]bench:[/yellow] installing the Node peers into bench/peers "
                  "(npm ci: bullmq, bun, bunqueue)")
    _run(["npm", "ci", "--no-audit", "--no-fund"], "npm ci", cwd=PEERS)
    if not BUN.exists():
        raise PeerUnavailable("npm package bun installed no bun binary for this platform")


NODE_CLIENT = BENCH.parent / "clients" / "node"


def ensure_node_client() -> Path:
    """clients/node built (npm ci + tsc on first use or after a change); returns dist/index.js."""
    if not shutil.which("node") or not shutil.which("npm"):
        raise PeerUnavailable("Node.js/npm not found: the shardq Node client needs them")
    marker = NODE_CLIENT / "node_modules" / ".package-lock.json"
    lock = NODE_CLIENT / "package-lock.json"
    if not marker.exists() or marker.stat().st_mtime < lock.stat().st_mtime:
        _run(["npm", "ci", "--no-audit", "--no-fund"], "npm ci (clients/node)", cwd=NODE_CLIENT)
    dist = NODE_CLIENT / "dist" / "index.js"
    newest = max(f.stat().st_mtime for f in (NODE_CLIENT / "src").glob("*.ts"))
    if not dist.exists() or dist.stat().st_mtime < newest:
        _run(["npm", "run", "build"], "build clients/node", cwd=NODE_CLIENT)
    return dist


def ensure_bullmq_python() -> Path:
    """The venv with BullMQ's Python package; created on first use."""
    if PYVENV_PY.exists():
        r = subprocess.run([str(PYVENV_PY), "-c", "import bullmq"], capture_output=True)
        if r.returncode == 0:
            return PYVENV_PY
    console.print("[yellow]bench:[/yellow] creating bench/peers/pyvenv with pip bullmq")
    _run([sys.executable, "-m", "venv", str(PYVENV)], "python -m venv")
    _run([str(PYVENV_PY), "-m", "pip", "install", "-q", "-r",
          str(PEERS / "requirements-bullmq-python.txt")], "pip install bullmq")
    return PYVENV_PY


def start_redis(data_dir: Path, aof: bool) -> tuple[Proc, int]:
    exe = ensure_redis()
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    persist = (["--appendonly", "yes", "--appendfsync", "everysec"] if aof
               else ["--appendonly", "no"])
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *persist,
            "--dir", str(data_dir), "--maxmemory-policy", "noeviction", "--protected-mode", "no"]
    return _serve("redis", argv, data_dir, port), port


def _serve(name: str, argv: list[str], data_dir: Path, port: int, *, cwd: Path | None = None,
           env: dict[str, str] | None = None) -> Proc:
    """Start a peer server logging to data_dir/<name>.log; return once its port answers."""
    log = open(data_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
    p = subprocess.Popen(argv, stdout=log, stderr=log, cwd=cwd, env=env, start_new_session=True)
    log.close()
    proc = Proc(name, p, f"127.0.0.1:{port}")
    try:
        wait_port("127.0.0.1", port)
    except RuntimeError:
        proc.stop()
        raise
    return proc


def start_bunqueue(data_dir: Path, sqlite: bool) -> tuple[Proc, int]:
    ensure_node_peers()
    port, http = free_port(), free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [str(BUN), str(NODE_MODULES / "bunqueue" / "dist" / "cli" / "index.js"), "start",
            "--host", "127.0.0.1", "--tcp-port", str(port), "--http-port", str(http)]
    if sqlite:
        argv += ["--data-path", str(data_dir / "bunqueue.db")]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BUNQUEUE_", "DATA_PATH", "BQ_"))}
    env["PATH"] = f"{NODE_MODULES / '.bin'}:{env.get('PATH', '')}"
    # bunqueue's server limits each client to 10,000 requests a minute by default (an abuse
    # guard); a benchmark client must not hit it, so it is lifted for these runs.
    env["RATE_LIMIT_MAX_REQUESTS"] = "1000000000"
    env["LOG_LEVEL"] = "error"
    return _serve("bunqueue", argv, data_dir, port, cwd=PEERS, env=env), port
