"""``source-agent loopback``: a destination on 127.0.0.1 in this very trio run, then one migration.

Both agents run in one process but talk only over real TCP, with the same code
paths as two hosts; the key is random and lives only in memory, so nothing
needs setting up. The server is cancelled (and every session with it) as soon
as the migration has ended, however it ended.
"""

from __future__ import annotations

import dataclasses
import secrets

import trio

from agentcore import AGENT_VERSION
from dest_agent import DestinationServer, ServerConfig
from kvmcore import HostCapabilities, System

from .migrate import Migration, MigrationPlan, migrate


async def loopback(plan: MigrationPlan, kvm: System, caps: HostCapabilities) -> Migration:
    """Serve on 127.0.0.1:0 with a fresh random key, migrate ``plan`` there, stop serving."""
    psk = secrets.token_bytes(32)
    server = DestinationServer(kvm, caps, ServerConfig(psk=psk, host="127.0.0.1", port=0,
                                                       max_memory=max(plan.memory_size, 2 << 20)),
                               AGENT_VERSION)
    result: Migration | Exception
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(server.serve)
        try:
            result = await migrate(dataclasses.replace(plan, host=host, port=port, psk=psk,
                                                       topology="loopback"), kvm, caps)
        except Exception as exc:  # noqa: BLE001 -- re-raised below, outside the nursery (no ExceptionGroup)
            result = exc
        nursery.cancel_scope.cancel()
    if isinstance(result, Exception):
        raise result
    return result
