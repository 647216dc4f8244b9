"""The destination agent: serves migrations, restoring each guest it receives.

``dest-agent serve`` runs a `DestinationServer`; each connection is one
`session` (HELLO, AUTH, clock sync, then MIGRATE -> memory -> COMMIT ->
restore -> REPORT, repeatable) under the server's nursery.  See docs/agents.md.
"""

from __future__ import annotations

from importlib import metadata

try:
    AGENT_VERSION = metadata.version("kvm-migration-testbed")
except metadata.PackageNotFoundError:   # running from a checkout that was never installed
    AGENT_VERSION = "0.0.0+unknown"

from .server import Counters, DestinationServer, ServerConfig

__all__ = ["AGENT_VERSION", "Counters", "DestinationServer", "ServerConfig"]
