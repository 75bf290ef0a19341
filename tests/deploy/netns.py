"""Hosts of a test's own making: network namespaces on one bridge (10.213.0.0/24).

A `Lan` is a "switch" namespace holding a bridge; each `host()` is a
namespace joined to it by a veth pair, with one address of 10.213.0.0/24.
Nothing is added to the test's own namespace: code that must talk to the
hosts runs through `Netns.call`, on a thread that entered that namespace
(setns(2) is per thread, and a child process forked from that thread is
born inside it, which is what `ip netns exec` does for a command). Names
carry a per-run token, so runs never collide; `close()` deletes every
namespace, and with them the veths and the bridge.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
SUBNET = "10.213.0"
CLONE_NEWNET = 0x40000000
CALL_TIMEOUT_S = 90.0


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def _enter(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


class Netns:
    """A named network namespace with a worker thread living inside it."""

    def __init__(self, name: str) -> None:
        self.name = name
        _ip("netns", "add", name)
        self._pool: ThreadPoolExecutor | None = None

    def ip(self, *args: str) -> None:
        _ip("-n", self.name, *args)

    def call(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Run `fn` inside this namespace (sockets it opens and processes it starts live here)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=self.name,
                                            initializer=_enter, initargs=(self.name,))
        return self._pool.submit(fn, *args, **kwargs).result(timeout=CALL_TIMEOUT_S)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)


class Lan:
    """A bridge in its own namespace, and hosts on it (see the module docstring)."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex[:8]
        self._spaces: list[Netns] = []
        self.switch = self._netns("sw")
        try:
            self.switch.ip("link", "add", "br0", "type", "bridge")
            self.switch.ip("link", "set", "br0", "up")
        except OSError:
            self.close()
            raise

    def host(self, name: str, octet: int) -> tuple[Netns, str]:
        """A host namespace `name` at 10.213.0.<octet>; returns it and its address."""
        ns = self._netns(name)
        port = f"p{octet}"  # the switch side; unique inside the switch namespace only
        self.switch.ip("link", "add", port, "type", "veth", "peer", "name", "eth0",
                       "netns", ns.name)
        self.switch.ip("link", "set", port, "master", "br0", "up")
        addr = f"{SUBNET}.{octet}"
        ns.ip("addr", "add", f"{addr}/24", "dev", "eth0")
        ns.ip("link", "set", "eth0", "up")
        ns.ip("link", "set", "lo", "up")
        return ns, addr

    def _netns(self, name: str) -> Netns:
        ns = Netns(f"shardq-{self.token}-{name}")
        self._spaces.append(ns)
        return ns

    def close(self) -> None:
        for ns in reversed(self._spaces):
            ns.close()
        self._spaces.clear()


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    if os.geteuid() != 0:
        return "not root: creating network namespaces needs CAP_SYS_ADMIN"
    try:
        lan = Lan()
    except OSError as e:
        return f"cannot create a network namespace here: {e}"
    try:
        lan.host("probe", 2)
    except OSError as e:
        return f"cannot create veth/bridge links here: {e}"
    finally:
        lan.close()
    return None


def leftovers(token: str) -> list[str]:
    """Namespaces of run `token` still present (none after `close()`)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         timeout=10).stdout
    return [line.split()[0] for line in out.splitlines() if f"shardq-{token}-" in line]
