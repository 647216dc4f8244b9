"""The testbed's wire protocol: a versioned, authenticated msgpack format over trio streams.

The core is sans-IO (`Session`: bytes in, messages out); `Channel` drives a
session over any trio stream, and `source_handshake` / `destination_handshake`
do HELLO, AUTH and clock sync for the two agents.  See docs/protocol.md.

The private modules, one concern each (in the manner of h11 and httpcore):

    _errors      every error, and the neutral FieldError for bad wire values
    _limits      the bounds on what a peer can make this side allocate
    _frames      frame layout and the bounded msgpack codec
    _messages    the messages and their field checks
    _auth        the key proofs and the frame MAC
    _state       the state table (and the NEED_DATA / END_OF_STREAM sentinels)
    _memory      one memory stream (ROUND or MIGRATE): its runs, the chunk rule, the MAC, the sink
    _session     the sans-IO session: framing, MAC, state, memory
    _io          the byte I/O a Channel needs (plain TCP fd path, any trio stream)
    _channel     Channel: a session driven over a trio stream, with timeouts
    _handshake   HELLO, AUTH and clock sync for the agents
    _tls         connecting over TCP and TLS
    _clocksync   the clock offset estimate; _keyfile: reading the pre-shared key
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
    Prepare,
    Prepared,
    Report,
    Role,
    Round,
)
from ._memory import pack_runs
from ._session import Preparation, Session
from ._state import END_OF_STREAM, NEED_DATA, State
from ._channel import Channel
from ._handshake import Handshake, destination_handshake, source_handshake
from ._tls import open_channel, tls_client_context, tls_server_context

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
    "Preparation",
    "Prepare",
    "Prepared",
    "ProtocolError",
    "ProtocolTimeout",
    "RemoteProtocolError",
    "Report",
    "Role",
    "Round",
    "Session",
    "pack_runs",
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
