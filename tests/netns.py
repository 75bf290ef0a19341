"""Network namespaces as test hosts, for partition tests (iproute2, root only).

A `Lab` makes namespaces and veth pairs with addresses, runs processes in a
namespace (`ip netns exec`, through `Proc(prefix=...)`), opens sockets from
inside one (`call_in`), and cuts or heals a link with `ip link set down/up`
(both ends lose carrier at once: the packets are dropped, no RST is sent, as
in a real partition). `close()` kills what still runs in its namespaces (by
pid, from `ip netns pids`) and deletes them with their links; it is safe to
call twice and after a failed setup.

Addresses come from 10.215.0.0/16 on the root side, picked free at setup
(other test runs share the root namespace), and only ever name hosts made
here.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import itertools
import os
import random
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
PREFIX = "sqt"  # every namespace and device made here starts with it
ROOT_NET = ipaddress.ip_network("10.215.0.0/16")
_counter = itertools.count()


def unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> str:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


@dataclass(frozen=True, slots=True)
class Link:
    """A veth pair: `dev_a` in `ns_a` (None: the root namespace), `dev_b` in `ns_b`."""

    ns_a: str | None
    dev_a: str
    addr_a: str
    ns_b: str
    dev_b: str
    addr_b: str


class Lab:
    """Namespaces and links of one test; `close()` removes all of them."""

    def __init__(self) -> None:
        self.tag = f"{PREFIX}{os.getpid() % 100000}x{next(_counter)}"
        self.namespaces: list[str] = []
        self.links: list[Link] = []
        _reap_stale()

    # ------------------------------------------------------------ building
    def host(self, name: str) -> str:
        """A new namespace (its loopback up); returns its full name."""
        ns = f"{self.tag}-{name}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def link(self, ns_a: str | None, ns_b: str, subnet: str | None = None) -> Link:
        """A veth pair between `ns_a` (None: root) and `ns_b` on a /30, `.1`
        on the a side and `.2` on the b side. Without `subnet`, a free /30 of
        ROOT_NET is picked (needed when one side is the shared root namespace)."""
        net = ipaddress.ip_network(subnet) if subnet else _free_subnet()
        a, b = (str(h) for h in itertools.islice(net.hosts(), 2))
        n = len(self.links)
        dev_a, dev_b = f"{self.tag}a{n}", f"{self.tag}b{n}"
        _ip("link", "add", dev_a, "type", "veth", "peer", "name", dev_b)
        link = Link(ns_a, dev_a, a, ns_b, dev_b, b)
        self.links.append(link)
        if ns_a is not None:
            _ip("link", "set", dev_a, "netns", ns_a)
        _ip("link", "set", dev_b, "netns", ns_b)
        for ns, dev, addr in ((ns_a, dev_a, a), (ns_b, dev_b, b)):
            _ip(*_in(ns), "addr", "add", f"{addr}/{net.prefixlen}", "dev", dev)
            _ip(*_in(ns), "link", "set", dev, "up")
        return link

    def route(self, ns: str, dest: str, via: str) -> None:
        _ip("-n", ns, "route", "add", dest, "via", via)

    # ------------------------------------------------------------ using
    @staticmethod
    def exec_prefix(ns: str) -> list[str]:
        """The argv prefix that runs a command inside `ns`."""
        return ["ip", "netns", "exec", ns]

    @staticmethod
    def call_in(ns: str, fn: Callable[[], T]) -> T:
        """Run `fn` on a thread that entered `ns`: the sockets it opens live
        there (a network namespace is per thread) and can be used from any
        thread afterwards."""
        out: list[T] = []
        err: list[BaseException] = []

        def run() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns into {ns}")
                finally:
                    os.close(fd)
                out.append(fn())
            except BaseException as exc:  # handed to the caller's thread
                err.append(exc)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(60)
        if err:
            raise err[0]
        if not out:
            raise TimeoutError(f"nothing came back from {ns} in 60 s")
        return out[0]

    def cut(self, link: Link) -> None:
        """Partition the link: both ends lose carrier, packets are dropped."""
        _ip(*_in(link.ns_a), "link", "set", link.dev_a, "down")

    def heal(self, link: Link) -> None:
        _ip(*_in(link.ns_a), "link", "set", link.dev_a, "up")

    # ------------------------------------------------------------ cleanup
    def close(self) -> None:
        for ns in self.namespaces:
            _kill_pids_in(ns)
        for link in self.links:  # deleting one end deletes the pair
            subprocess.run(["ip", *_in(link.ns_a), "link", "del", link.dev_a],
                           capture_output=True, timeout=10)
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self.namespaces.clear()
        self.links.clear()


def _in(ns: str | None) -> list[str]:
    return ["-n", ns] if ns is not None else []


def _free_subnet() -> ipaddress.IPv4Network:
    used = [ipaddress.ip_interface(w).network
            for line in _ip("-o", "-4", "addr", "show").splitlines()
            for w in line.split() if "/" in w and w[0].isdigit()]
    subnets = list(ROOT_NET.subnets(new_prefix=30))
    for net in random.sample(subnets, 64):
        if not any(net.overlaps(u) for u in used):
            return net  # type: ignore[return-value]
    raise RuntimeError(f"no free /30 in {ROOT_NET}")


def _kill_pids_in(ns: str) -> None:
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10)
    for word in r.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(word), signal.SIGKILL)


def _reap_stale() -> None:
    """Delete namespaces left by a test run that died (its pid is gone)."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX) or "x" not in name or "-" not in name:
            continue
        pid = name[len(PREFIX):].split("x", 1)[0]
        if not pid.isdigit() or _pid_alive_like(int(pid)):
            continue
        _kill_pids_in(name)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def _pid_alive_like(pid_mod: int) -> bool:
    """Whether some live process's pid matches the tag's (pid mod 100000):
    conservative, a namespace is kept while any such process lives."""
    return any(int(p) % 100000 == pid_mod for p in os.listdir("/proc") if p.isdigit())
