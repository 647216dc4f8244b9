"""How each point's latency, jitter and bandwidth are put on the path.

Two injectors, one per point (each point gets a fresh one, so its statistics
are that point's alone):

- ``tc``: netem qdiscs on both ends of the namespace's veth pair (a qdisc
  shapes egress only, so both ends for an RTT of 2 × latency). Kernel-side, no
  extra hop. Only on the ``netns`` topology: on ``loopback`` or ``remote`` it
  would shape an interface of the host that other traffic uses.
- ``relay``: the userspace delay relay on 127.0.0.1, forwarding to the
  destination. Works everywhere; the choice wherever the kernel lacks
  ``sch_netem`` (as on this project's CI hosts).

``auto`` takes ``tc`` where it can and says why not otherwise; the choice and
its reason go into every run's report, next to the RTT the migration's clock
sync measured through the injector.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from source_agent.netem import apply_netem, netem_unsupported, open_relay, remove_netem

from .plan import PointConfig, injector_conflict
from .topology import Endpoint

#: How long removing a point's qdiscs may take after a cancellation (the namespace goes anyway).
CLEANUP_TIMEOUT = 5.0


class InjectorError(Exception):
    """The requested injector cannot be used with this topology or on this host."""


@dataclass(frozen=True)
class Injector:
    """The injector a sweep uses, and why (recorded with every run)."""

    kind: str
    reason: str


async def choose_injector(requested: str, topology: str) -> Injector:
    """``auto`` → ``tc`` on netns where ``sch_netem`` works, else ``relay``; InjectorError for an impossible request."""
    if requested == "relay":
        return Injector("relay", "requested (--injector relay)")
    conflict = injector_conflict(requested, topology)
    if conflict:
        raise InjectorError(conflict)
    if topology != "netns":
        return Injector("relay", f"{topology} topology: no link of our own to shape with tc")
    missing = await trio.to_thread.run_sync(netem_unsupported)
    if missing is None:
        return Injector("tc", "sch_netem available" if requested == "auto" else "requested")
    if requested == "tc":
        raise InjectorError(f"--injector tc: unsupported on this host: {missing}")
    return Injector("relay", f"unsupported on this host: {missing}")


@dataclass
class Injection:
    """One point's impaired path: where the source connects, and what to record about the path."""

    address: tuple[str, int]
    describe: Callable[[], dict[str, Any]]


@asynccontextmanager
async def inject(injector: Injector, endpoint: Endpoint, point: PointConfig) -> AsyncIterator[Injection]:
    """Impair the path to ``endpoint`` as ``point`` says, for the duration of the block."""
    link = point.link
    if injector.kind == "relay":
        async with open_relay(endpoint.address, up=link, down=link) as relay:
            yield Injection(relay.address, lambda: {**relay.report(), "reason": injector.reason})
        return
    assert endpoint.netns is not None
    netns = endpoint.netns
    try:
        await apply_netem(netns.host_if, link)
        await apply_netem(netns.ns_if, link, netns=netns.namespace)
        yield Injection(endpoint.address, lambda: {
            "injector": "tc", "reason": injector.reason, "up_link": str(link),
            "down_link": str(link), "devices": [netns.host_if, f"{netns.namespace}/{netns.ns_if}"]})
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
            for dev, ns in ((netns.host_if, None), (netns.ns_if, netns.namespace)):
                try:
                    await remove_netem(dev, netns=ns)
                except Exception:  # noqa: BLE001, S110 - best effort: the namespace is deleted at the end
                    pass
