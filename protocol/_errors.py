"""Every error the protocol raises, in one place.

The hierarchy says whose fault a failure is (in the manner of h11): a
`LocalProtocolError` is a bug on this side, a `RemoteProtocolError` is the
peer's bug or an attack.  Each class carries an ``error_code``: the code this
side puts in the ERROR message it sends to the peer when the failure happens
(see `protocol.Error.from_exception`); `peer_error` maps a received ERROR back.

`FieldError` is the one neutral error for a bad wire value: the codec and the
message checks raise it without knowing who made the value, and the session
turns it into a local or a remote error, which names the state.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AuthenticationFailed",
    "ConnectionClosed",
    "FieldError",
    "IntegrityError",
    "LimitError",
    "LimitExceeded",
    "LocalProtocolError",
    "PeerError",
    "ProtocolError",
    "ProtocolTimeout",
    "RemoteProtocolError",
    "VersionMismatch",
    "peer_error",
]


class ProtocolError(Exception):
    """Base class: raised when the conversation cannot continue as the protocol defines it."""

    error_code: ClassVar[str] = "protocol"


class LocalProtocolError(ProtocolError):
    """Raised when this side tries to send something the protocol forbids (a bug in the caller)."""


class RemoteProtocolError(ProtocolError):
    """Raised when the peer sent bytes or a message the protocol forbids (a bug or an attack)."""


class LimitExceeded(RemoteProtocolError):
    """Raised when the peer's frame, container, nesting, memory size or count exceeds a limit."""

    error_code = "limit"


class IntegrityError(RemoteProtocolError):
    """Raised when the memory stream's digest in COMMIT differs from the bytes received."""

    error_code = "integrity"


class ConnectionClosed(RemoteProtocolError):
    """Raised when the stream ends or breaks before the conversation ended with BYE or ERROR."""

    error_code = "closed"


class AuthenticationFailed(ProtocolError):
    """Raised when a side fails to prove the pre-shared key, or a frame's MAC does not verify."""

    error_code = "auth"


class VersionMismatch(ProtocolError):
    """Raised on both sides when the two agents speak different protocol versions."""

    error_code = "version"


class ProtocolTimeout(ProtocolError):
    """Raised by the trio channel when a message or an idle period exceeds its timeout."""

    error_code = "timeout"


class PeerError(ProtocolError):
    """Raised by the trio channel when the peer sent an ERROR message; carries its code and text."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"peer reported error {code!r}: {message}")
        self.code = code
        self.message = message


def peer_error(peer: str, code: str, message: str) -> ProtocolError:
    """The error to raise for an ERROR ``code`` the ``peer`` sent: its own class where the
    protocol has one for both sides (version, auth), else `PeerError`."""
    if code == VersionMismatch.error_code:
        return VersionMismatch(f"the {peer} refused the session: {message}")
    if code == AuthenticationFailed.error_code:
        return AuthenticationFailed(f"the {peer} refused the authentication: {message}")
    return PeerError(code, message)


class FieldError(Exception):
    """Internal: a wire value is malformed; the session raises it as a local or remote error."""


class LimitError(FieldError):
    """Internal: a wire value exceeds a limit; becomes `LimitExceeded` when the peer sent it."""
