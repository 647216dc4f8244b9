"""Network conditions for the migration experiments: a userspace delay relay, tc netem, netns topologies.

Nothing here knows the wire format: the relay forwards opaque bytes, so it
sits between any two agents.
"""

from __future__ import annotations

from ._errors import CommandError, ImpairmentError, NetemError, Unsupported
from ._pipe import DEFAULT_BUFFER, DirectionStats, Gate, Pipe, TokenBucket
from .link import Link, format_duration, format_rate, parse_duration, parse_rate
from .relay import Relay, RelayStats, open_relay

__all__ = [
    "CommandError", "DEFAULT_BUFFER", "DirectionStats", "Gate", "ImpairmentError", "Link", "NetemError", "Pipe",
    "Relay", "RelayStats", "TokenBucket", "Unsupported", "format_duration", "format_rate",
    "open_relay", "parse_duration", "parse_rate",
]
