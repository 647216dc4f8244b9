"""The testbed's wire protocol: a versioned, authenticated msgpack format over trio streams.

The core is sans-IO (`Session`: bytes in, messages out); `Channel` drives a
session over any trio stream, and `source_handshake` / `destination_handshake`
do HELLO, AUTH and clock sync for the two agents.  See docs/protocol.md.
"""

from __future__ import annotations

from ._clocksync import ClockEstimate, ClockSample, estimate_clock_offset
from ._errors import (
    AuthenticationFailed,
    ConnectionClosed,
    IntegrityError,
    LimitExceeded,
    LocalProtocolError,
    PeerError,
    ProtocolError,
    ProtocolTimeout,
    RemoteProtocolError,
    VersionMismatch,
)
from ._keyfile import MIN_PSK_SIZE, KeyFileError, load_psk
from ._limits import PAGE_SIZE, GiB, KiB, Limits, MiB
from ._messages import (
    PROTOCOL_VERSION,
    Auth,
    Bye,
    ClockSyncReply,
    ClockSyncRequest,
    Commit,
    Error,
    Hello,
    MemoryChunk,
    Message,
    Migrate,
    Report,
    Role,
)
from ._session import END_OF_STREAM, NEED_DATA, Session, State
from ._trio import (
    Channel,
    Handshake,
    destination_handshake,
    open_channel,
    source_handshake,
    tls_client_context,
    tls_server_context,
)

__all__ = [
    "END_OF_STREAM",
    "NEED_DATA",
    "PAGE_SIZE",
    "PROTOCOL_VERSION",
    "Auth",
    "AuthenticationFailed",
    "Bye",
    "Channel",
    "ClockEstimate",
    "ClockSample",
    "ClockSyncReply",
    "ClockSyncRequest",
    "Commit",
    "ConnectionClosed",
    "Error",
    "GiB",
    "Handshake",
    "Hello",
    "IntegrityError",
    "KeyFileError",
    "KiB",
    "LimitExceeded",
    "Limits",
    "LocalProtocolError",
    "MIN_PSK_SIZE",
    "MemoryChunk",
    "Message",
    "MiB",
    "Migrate",
    "PeerError",
    "ProtocolError",
    "ProtocolTimeout",
    "RemoteProtocolError",
    "Report",
    "Role",
    "Session",
    "State",
    "VersionMismatch",
    "destination_handshake",
    "estimate_clock_offset",
    "load_psk",
    "open_channel",
    "source_handshake",
    "tls_client_context",
    "tls_server_context",
]
