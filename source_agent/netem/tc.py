"""``tc netem``: the kernel's delay/jitter/rate injector, where the kernel has ``sch_netem``.

The kernel qdisc is preferred where available because it delays packets, not
bytes inside one process, and costs no userspace hop; many CI kernels (this
project's included) ship without it, so it is always probed first, on a veth
inside a throwaway namespace, never on a real interface of the host.

Commands are built as argv lists (`netem_commands`) so they are unit-tested
without a kernel; `apply_netem` / `remove_netem` run them with trio.
"""

from __future__ import annotations

import functools

import trio

from . import _ip
from ._errors import CommandError, Unsupported
from .link import Link

#: Packets netem's child FIFO may hold (``tc``'s own default for netem is 1000).
FIFO_LIMIT = 1000


def _usec(seconds: float) -> str:
    return f"{round(seconds * 1e6)}us"


def netem_commands(dev: str, link: Link, *, netns: str | None = None) -> list[list[str]]:
    """The ``tc`` argv lists that give ``dev`` this link (replacing its root qdisc).

    With jitter, netem's internal queue sorts packets by send time and so
    reorders them; a ``pfifo`` child keeps them in order, matching the relay's
    "jitter never reorders" (see tc-netem(8), "delay distribution").
    """
    tc = ["tc"] + (["-n", netns] if netns else [])
    netem = [*tc, "qdisc", "replace", "dev", dev, "root", "handle", "1:", "netem",
             "delay", _usec(link.delay)]
    if link.jitter:
        netem.append(_usec(link.jitter))
    if link.rate is not None:
        netem += ["rate", f"{round(link.rate * 8)}bit"]
    commands = [netem]
    if link.jitter:
        commands.append([*tc, "qdisc", "replace", "dev", dev, "parent", "1:1", "pfifo",
                         "limit", str(FIFO_LIMIT)])
    return commands


def remove_command(dev: str, *, netns: str | None = None) -> list[str]:
    tc = ["tc"] + (["-n", netns] if netns else [])
    return [*tc, "qdisc", "del", "dev", dev, "root"]


def probe_qdisc(*qdisc: str) -> str | None:
    """None if ``tc qdisc add ... root <qdisc>`` works here, else why not (with tc's own words).

    Runs on a veth pair inside a fresh namespace that is deleted afterwards, so
    the probe never touches the host's interfaces.
    """
    namespace = _ip.unique_namespace()
    try:
        _ip.run(["ip", "netns", "add", namespace])
    except CommandError as exc:
        return f"network namespaces (needed to probe qdisc {qdisc[0]}): {exc.stderr}"
    try:
        _ip.run(["ip", "-n", namespace, "link", "add", "probe0", "type", "veth",
                 "peer", "name", "probe1"])
        done = _ip.run(["tc", "-n", namespace, "qdisc", "add", "dev", "probe0", "root", *qdisc],
                       check=False)
        if done.returncode != 0:
            return f"sch_{qdisc[0]} (tc said: {done.stderr.strip() or f'exit {done.returncode}'})"
        return None
    finally:
        _ip.delete_namespace(namespace)


@functools.cache
def netem_unsupported() -> str | None:
    """None where ``sch_netem`` works, else the reason; probed once per process."""
    return probe_qdisc("netem", "delay", "1ms")


def require_netem() -> None:
    """Raise `Unsupported` ("unsupported on this host: sch_netem (tc said: ...)") where netem is missing."""
    reason = netem_unsupported()
    if reason is not None:
        raise Unsupported(f"unsupported on this host: {reason}")


async def _run(argv: list[str]) -> None:
    done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    if done.returncode != 0:
        raise CommandError(argv, done.returncode, done.stderr.decode(errors="replace"))


async def apply_netem(dev: str, link: Link, *, netns: str | None = None) -> None:
    """Give ``dev`` (inside ``netns`` if given) the link's delay, jitter and rate.

    Only the egress of ``dev`` is shaped, as with any qdisc: for an RTT of
    ``2 × delay`` apply it on both ends of a veth pair.
    """
    await trio.to_thread.run_sync(require_netem)
    for argv in netem_commands(dev, link, netns=netns):
        await _run(argv)


async def remove_netem(dev: str, *, netns: str | None = None) -> None:
    """Restore ``dev``'s default qdisc."""
    await _run(remove_command(dev, netns=netns))
