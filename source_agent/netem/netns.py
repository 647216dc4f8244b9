"""Two hosts on one machine: the destination in its own network namespace, joined by veth.

The source stays in the root namespace; the destination agent runs inside
``topology.namespace`` and is reached at ``topology.ns_address``. Traffic then
crosses a real (virtual) link with its own interfaces, routes and qdiscs, so
tc netem can shape it where the kernel has it, and a crashed agent cannot
bind anything the host sees.

Teardown is the point of this module. `open_topology` runs with trio's
KeyboardInterrupt protection (Ctrl-C inside it is deferred to the next
checkpoint, which is in the caller's block), creates in a worker thread that
trio cannot abandon, and deletes *synchronously* in its ``finally``: no
checkpoint, so neither a cancellation nor a second Ctrl-C can stop a delete
half-way. The price is blocking the event loop for the few ``ip`` commands of
the delete (tens of milliseconds) when the experiment is over anyway.
Whatever ``kill -9`` or an unhandled SIGTERM leaves behind is found by name
(`cleanup_stale`) on the next run.
"""

from __future__ import annotations

import fcntl
import functools
import ipaddress
import os
import re
import subprocess
import tempfile
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator

import trio

from . import _ip
from ._errors import CommandError, Unsupported

#: Where we number links: 10.201.<n>.0/30, host side .1, namespace side .2.
SUBNET = ipaddress.ip_network("10.201.0.0/16")

#: Serialises subnet choice and stale cleanup between parallel runs on this machine.
LOCK_PATH = os.path.join("/run/lock" if os.path.isdir("/run/lock") else tempfile.gettempdir(),
                         "source-agent-netem.lock")


@dataclass(frozen=True)
class Topology:
    """A namespace joined to the root namespace by one veth pair with a /30 on it."""

    namespace: str
    host_if: str
    ns_if: str
    host_address: str
    ns_address: str

    def exec_argv(self, argv: list[str]) -> list[str]:
        """``argv`` wrapped to run inside the namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    async def run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        """`trio.run_process` inside the namespace.

        ``await nursery.start(partial(topology.run, argv))`` starts it in the
        background and returns the `trio.Process`; cancelling the nursery kills
        it. Anything still running inside at teardown is killed too.
        """
        return await trio.run_process(self.exec_argv(argv), **kwargs)


_HOST_LINK = re.compile(r"^nm([0-9a-f]{6})h$")


def _names(namespace: str) -> tuple[str, str]:
    token = _ip.token_of(namespace)
    return f"nm{token}h", f"nm{token}g"  # 9 characters: well within IFNAMSIZ


def namespace_exists(namespace: str) -> bool:
    return namespace in _ip.namespaces()


def link_exists(ifname: str) -> bool:
    return _ip.run(["ip", "link", "show", "dev", ifname], check=False).returncode == 0


def leftovers(topology: Topology) -> list[str]:
    """What of ``topology`` still exists (empty after a clean teardown)."""
    found = [f"namespace {topology.namespace}"] if namespace_exists(topology.namespace) else []
    return found + ([f"link {topology.host_if}"] if link_exists(topology.host_if) else [])


@functools.cache
def netns_unsupported() -> str | None:
    """None where namespaces and veth work here, else the reason (probed once, changes nothing)."""
    namespace = _ip.unique_namespace()
    try:
        _ip.run(["ip", "netns", "add", namespace])
        _ip.run(["ip", "-n", namespace, "link", "add", "probe0", "type", "veth",
                 "peer", "name", "probe1"])
    except CommandError as exc:
        return f"network namespaces ({exc})"
    finally:
        _ip.delete_namespace(namespace)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    used = _ip.run(["ip", "-4", "-o", "addr", "show"]).stdout
    for subnet in SUBNET.subnets(new_prefix=30):
        if f" {subnet[1]}/" not in used and f" {subnet[2]}/" not in used:
            return subnet
    raise CommandError(["ip", "-4", "addr", "show"], 0, f"no free /30 left in {SUBNET}")


@contextmanager
def _machine_lock() -> Iterator[None]:
    """Serialise subnet choice and stale cleanup with other runs on this machine.

    Without it, a cleanup could see a parallel run's fresh host link before
    its namespace was listed, and delete it.
    """
    with open(LOCK_PATH, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _create(namespace: str) -> Topology:
    host_if, ns_if = _names(namespace)
    with _machine_lock():
        _ip.run(["ip", "netns", "add", namespace])
        _ip.run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if,
                 "netns", namespace])
        subnet = _free_subnet()
        host_address, ns_address = str(subnet[1]), str(subnet[2])
        _ip.run(["ip", "addr", "add", f"{host_address}/30", "dev", host_if])
    for argv in (["ip", "link", "set", host_if, "up"],
                 ["ip", "-n", namespace, "addr", "add", f"{ns_address}/30", "dev", ns_if],
                 ["ip", "-n", namespace, "link", "set", ns_if, "up"],
                 ["ip", "-n", namespace, "link", "set", "lo", "up"]):
        _ip.run(argv)
    return Topology(namespace, host_if, ns_if, host_address, ns_address)


def _destroy(namespace: str) -> None:
    """Delete the host end of the veth pair (which takes its peer), then the namespace.

    In this order because a namespace is destroyed asynchronously by the
    kernel: deleting it first would leave the host link around for a moment.
    """
    host_if, _ = _names(namespace)
    _delete_link(host_if)
    _ip.delete_namespace(namespace)


def _delete_link(ifname: str) -> None:
    done = _ip.run(["ip", "link", "delete", ifname], check=False)
    if done.returncode != 0 and link_exists(ifname):
        raise CommandError(["ip", "link", "delete", ifname], done.returncode, done.stderr)


def cleanup_stale() -> list[str]:
    """Delete namespaces (and host-side links) left by runs of ours whose process is gone."""
    with _machine_lock():
        return _cleanup_stale()


def _cleanup_stale() -> list[str]:
    removed = []
    existing = _ip.namespaces()
    for namespace in existing:
        pid = _ip.owner_pid(namespace)
        if pid is not None and not _ip.pid_alive(pid):
            _destroy(namespace)
            removed.append(namespace)
    live_tokens = {_ip.token_of(n) for n in existing if n not in removed and _ip.owner_pid(n)}
    links = _ip.run(["ip", "-o", "link", "show", "type", "veth"]).stdout
    for line in links.splitlines():
        ifname = line.split(":")[1].strip().split("@")[0]
        match = _HOST_LINK.match(ifname)
        if match and match.group(1) not in live_tokens:
            _delete_link(ifname)
            removed.append(ifname)
    return removed


@asynccontextmanager
@trio.lowlevel.enable_ki_protection
async def open_topology(*, clean_stale: bool = True) -> AsyncIterator[Topology]:
    """Create a namespace joined to this one by veth; delete it on every way out.

    Raises `Unsupported` ("unsupported on this host: network namespaces (...)")
    before creating anything where the host does not allow it.
    """
    reason = await trio.to_thread.run_sync(netns_unsupported)
    if reason is not None:
        raise Unsupported(f"unsupported on this host: {reason}")
    if clean_stale:
        await trio.to_thread.run_sync(cleanup_stale)
    namespace = _ip.unique_namespace()
    try:
        yield await trio.to_thread.run_sync(_create, namespace)
    finally:
        _destroy(namespace)
