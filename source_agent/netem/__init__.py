"""Network conditions for the migration experiments: a userspace delay relay, tc netem, netns topologies.

Nothing here knows the wire format: the relay forwards opaque bytes, so it
sits between any two agents. See docs/netem.md.
"""

from __future__ import annotations

from ._errors import CommandError, ImpairmentError, NetemError, Unsupported
from ._pipe import DEFAULT_BUFFER, DirectionStats, Gate, Pipe, TokenBucket
from .link import Link, format_duration, format_rate, parse_duration, parse_rate
from .netns import Topology, cleanup_stale, netns_unsupported, open_topology
from .relay import Relay, RelayStats, open_relay
from .tc import apply_netem, netem_commands, netem_unsupported, remove_netem, require_netem

__all__ = [
    "CommandError", "DEFAULT_BUFFER", "DirectionStats", "Gate", "ImpairmentError", "Link",
    "NetemError", "Pipe", "Relay", "RelayStats", "TokenBucket", "Topology", "Unsupported",
    "apply_netem", "cleanup_stale", "format_duration", "format_rate", "netem_commands",
    "netem_unsupported", "netns_unsupported", "open_relay", "open_topology", "parse_duration",
    "parse_rate", "remove_netem", "require_netem",
]
