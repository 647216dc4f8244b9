"""The destination agent: serves migrations, restoring each guest it receives.

``dest-agent serve`` runs a `DestinationServer`; each connection is one
`session` (HELLO, AUTH, clock sync, then PREPARE -> PREPARED -> precopy ROUNDs ->
MIGRATE -> memory -> COMMIT -> restore into the prepared VM -> REPORT, or the
seed's MIGRATE from READY; repeatable) under the server's nursery.  See
docs/agents.md.
"""

from __future__ import annotations

from agentcore import AGENT_VERSION

from .server import Counters, DestinationServer, ServerConfig

__all__ = ["AGENT_VERSION", "Counters", "DestinationServer", "ServerConfig"]
