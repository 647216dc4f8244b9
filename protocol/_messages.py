"""The messages of the protocol, as frozen dataclasses, with their validation.

On the wire every message is one msgpack map: ``{"type": <name>, <field>:
<value>, ...}`` with exactly the fields below, no more, no fewer.  The same
checks run on what this side sends (a `LocalProtocolError`) and on what the
peer sends (a `RemoteProtocolError`, or `LimitExceeded` for a bound).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

from ._errors import FieldError, LimitError, ProtocolError
from ._frames import check_plain
from ._limits import PAGE_SIZE, Limits

__all__ = [
    "PROTOCOL_VERSION",
    "Auth",
    "Bye",
    "ClockSyncReply",
    "ClockSyncRequest",
    "Commit",
    "Error",
    "Hello",
    "MemoryChunk",
    "Message",
    "Migrate",
    "Prepare",
    "Prepared",
    "Report",
    "Role",
    "Round",
]

#: Bumped on any change of the wire format; both sides must speak the same one.
#: 2: COMMIT carries a Poly1305 tag (was a SHA-256 digest); MIGRATE carries runs.
#: 3: PREPARE/PREPARED and precopy ROUNDs; each memory stream (ROUND or MIGRATE) has its own key.
PROTOCOL_VERSION = 3

Role = Literal["source", "destination"]
ROLES: tuple[Role, Role] = ("source", "destination")

NONCE_SIZE = 32
PROOF_SIZE = 32
MEMORY_TAG_SIZE = 16
MAX_TEXT = 4096
_INT64 = (-(2**63), 2**63 - 1)
_UINT64_MAX = 2**64 - 1

_Check = Callable[[Any, Limits, str], None]


def _int(lo: int, hi: int) -> _Check:
    def check(value: Any, limits: Limits, where: str) -> None:
        if type(value) is not int:
            raise FieldError(f"{where}: expected int, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise FieldError(f"{where}: {value} outside [{lo}, {hi}]")

    return check


def _bytes(size: int) -> _Check:
    def check(value: Any, limits: Limits, where: str) -> None:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise FieldError(f"{where}: expected bytes, got {type(value).__name__}")
        if len(value) != size:
            raise FieldError(f"{where}: expected {size} bytes, got {len(value)}")

    return check


def _text(max_len: int, pattern: str | None = None) -> _Check:
    compiled = re.compile(pattern) if pattern else None

    def check(value: Any, limits: Limits, where: str) -> None:
        if type(value) is not str:
            raise FieldError(f"{where}: expected str, got {type(value).__name__}")
        if len(value) > max_len:
            raise LimitError(f"{where}: longer than {max_len} characters")
        if compiled is not None and not compiled.fullmatch(value):
            raise FieldError(f"{where}: {value!r} does not match {pattern}")

    return check


def _plain_map(allow_float: bool) -> _Check:
    def check(value: Any, limits: Limits, where: str) -> None:
        check_plain(value, limits, allow_float=allow_float, where=where)

    return check


def _role(value: Any, limits: Limits, where: str) -> None:
    if value not in ROLES or type(value) is not str:
        raise FieldError(f"{where}: expected 'source' or 'destination', got {value!r}")


def _memory_size(value: Any, limits: Limits, where: str) -> None:
    _int(PAGE_SIZE, _UINT64_MAX)(value, limits, where)
    if value % PAGE_SIZE:
        raise FieldError(f"{where}: {value} is not a multiple of the page size {PAGE_SIZE}")
    if value > limits.max_memory_size:
        raise LimitError(f"{where}: {value} bytes exceeds the limit {limits.max_memory_size}")


def _chunk_size(value: Any, limits: Limits, where: str) -> None:
    _int(PAGE_SIZE, _UINT64_MAX)(value, limits, where)
    if value % PAGE_SIZE:
        raise FieldError(f"{where}: {value} is not a multiple of the page size {PAGE_SIZE}")
    if value > limits.max_chunk_size:
        raise LimitError(f"{where}: {value} bytes exceeds the limit {limits.max_chunk_size}")


def _runs(value: Any, limits: Limits, where: str) -> None:
    # Their content is checked with memory_size, by _memory.parse_runs.
    if value is not None and not isinstance(value, (bytes, bytearray)):
        raise FieldError(f"{where}: expected bytes or None, got {type(value).__name__}")


_timestamp = _int(*_INT64)


class Message:
    """Base class of every message; ``TYPE`` is its name on the wire."""

    TYPE: ClassVar[str]
    _CHECKS: ClassVar[dict[str, _Check]]
    #: (field, check, name in errors), computed once from _CHECKS.
    _FIELDS: ClassVar[tuple[tuple[str, _Check, str], ...]]
    _KEYS: ClassVar[frozenset[str]]

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message (not validated; see `validate`)."""
        wire: dict[str, Any] = {"type": self.TYPE}
        for key, _, _ in self._FIELDS:
            wire[key] = getattr(self, key)
        return wire


@dataclass(frozen=True)
class Hello(Message):
    """First message of each side: who it is and what it speaks.

    The source sends it first, the destination answers with its own.  A
    different ``protocol_version`` ends the session with an ERROR
    ``version`` before anything else is read.  ``nonce`` is this side's fresh
    random challenge: the peer's AUTH proof covers it, which is what makes
    an old proof useless in a new session.  Build it with `Session.make_hello`.
    """

    TYPE: ClassVar[str] = "hello"
    protocol_version: int
    agent_version: str
    role: Role
    #: The host's capability summary: a bounded plain map (floats allowed).
    capabilities: Mapping[str, Any]
    nonce: bytes


@dataclass(frozen=True)
class Auth(Message):
    """Proof that the sender holds the pre-shared key.

    ``proof = HMAC-SHA256(psk, label || role || SHA-256(transcript of both
    HELLOs))``.  The source proves first; the destination proves only after
    checking the source's proof, so it never computes anything keyed for an
    unauthenticated peer.  Build it with `Session.make_auth`.
    """

    TYPE: ClassVar[str] = "auth"
    proof: bytes


@dataclass(frozen=True)
class ClockSyncRequest(Message):
    """Source to destination: one NTP-style exchange; ``t1`` is the source's send time (ns)."""

    TYPE: ClassVar[str] = "clock_request"
    t1: int


@dataclass(frozen=True)
class ClockSyncReply(Message):
    """Destination's answer: ``t1`` echoed, ``t2`` its receive time, ``t3`` its send time (ns).

    The source adds ``t4`` (its receive time) and feeds the four to
    `estimate_clock_offset`.
    """

    TYPE: ClassVar[str] = "clock_reply"
    t1: int
    t2: int
    t3: int


@dataclass(frozen=True)
class Prepare(Message):
    """Source to destination, in READY: make ready for a migration of this guest.

    The destination checks ``strategy`` against its host, allocates
    ``memory_size`` bytes and creates the VM before answering PREPARED, so
    that none of it falls in the downtime.  ROUNDs and the MIGRATE that
    follow use this ``memory_size`` and ``chunk_size`` (the MIGRATE must
    announce the same ones); `Session.prepared` remembers them.
    """

    TYPE: ClassVar[str] = "prepare"
    strategy: str
    memory_size: int
    chunk_size: int


@dataclass(frozen=True)
class Prepared(Message):
    """Destination's answer to PREPARE: ready; ``prepare_ns`` is what preparing took (ns)."""

    TYPE: ClassVar[str] = "prepared"
    prepare_ns: int


@dataclass(frozen=True)
class Round(Message):
    """Source to destination, in PREPARED: one precopy round of memory, while the guest runs.

    ``runs`` as `Migrate.runs` (None: all of memory, as round 0 sends),
    checked against the prepared ``memory_size``; the memory follows as
    MEMORY chunks of the prepared ``chunk_size``, then COMMIT, under a
    one-time key of its own.  No answer: the session is back in PREPARED.
    """

    TYPE: ClassVar[str] = "round"
    runs: bytes | None = None


@dataclass(frozen=True)
class Migrate(Message):
    """Start of one migration: the VM state without its memory, and how the memory follows.

    ``state`` is opaque here (kvmcore validates it deeply); the protocol only
    bounds its size, depth and entries, and allows int, bytes, str, bool,
    None, lists and str-keyed maps.  ``runs`` says which memory follows:
    None for all ``memory_size`` bytes (stop-and-copy), else `pack_runs` of
    page-aligned ``(offset, length)`` runs, ascending and disjoint (the pages
    dirtied since precopy's last ROUND), possibly none.  Each run follows, in
    order, as MEMORY chunks of ``chunk_size`` bytes (its last one shorter),
    then COMMIT.  In PREPARED, ``memory_size`` and ``chunk_size`` must be the
    PREPARE's.
    """

    TYPE: ClassVar[str] = "migrate"
    state: Mapping[str, Any]
    strategy: str
    memory_size: int
    chunk_size: int
    runs: bytes | None = None


@dataclass(frozen=True)
class MemoryChunk(Message):
    """``data`` is guest memory at ``offset``; chunks follow the ROUND's or MIGRATE's runs in order and
    exactly cover them (all of ``memory_size`` without runs).

    On receipt into a buffer given to `Session.receive_memory_into`, ``data``
    is a view of that buffer where the bytes were written.
    """

    TYPE: ClassVar[str] = "memory"
    offset: int
    data: bytes | bytearray | memoryview


@dataclass(frozen=True)
class Commit(Message):
    """End of the memory stream: ``tag`` is the Poly1305 MAC of its data bytes, in order.

    Under the stream's (ROUND's or MIGRATE's) one-time key (docs/security.md); the destination
    checks it against what it received (`IntegrityError` if it differs)
    before it may use the memory.  Build it with `Session.make_commit`.
    """

    TYPE: ClassVar[str] = "commit"
    tag: bytes


@dataclass(frozen=True)
class Report(Message):
    """Destination to source after COMMIT: the outcome of the restore (a bounded plain map)."""

    TYPE: ClassVar[str] = "report"
    report: Mapping[str, Any]


@dataclass(frozen=True)
class Error(Message):
    """Either side, at any point: the session failed; ``code`` says the class, ``message`` why.

    The sender closes the stream after it.  Codes used by the protocol:
    ``protocol``, ``limit``, ``integrity``, ``auth``, ``version``,
    ``timeout``, ``closed``, ``internal``; agents may add their own
    (lowercase, digits, ``_``, at most 32 characters).
    """

    TYPE: ClassVar[str] = "error"
    code: str
    message: str

    @classmethod
    def from_exception(cls, exc: BaseException) -> Error:
        """The ERROR to send to the peer after ``exc`` ended the session on this side."""
        code = exc.error_code if isinstance(exc, ProtocolError) else "internal"
        text = str(exc) or type(exc).__name__
        return cls(code=code, message=text[:MAX_TEXT])


@dataclass(frozen=True)
class Bye(Message):
    """Either side, between migrations: the conversation is over; the stream closes next."""

    TYPE: ClassVar[str] = "bye"


Hello._CHECKS = {
    "protocol_version": _int(0, 0xFFFF),
    "agent_version": _text(128),
    "role": _role,
    "capabilities": _plain_map(allow_float=True),
    "nonce": _bytes(NONCE_SIZE),
}
Auth._CHECKS = {"proof": _bytes(PROOF_SIZE)}
ClockSyncRequest._CHECKS = {"t1": _timestamp}
ClockSyncReply._CHECKS = {"t1": _timestamp, "t2": _timestamp, "t3": _timestamp}
_strategy = _text(64, r"[A-Za-z0-9_,=\-]+")
Prepare._CHECKS = {"strategy": _strategy, "memory_size": _memory_size, "chunk_size": _chunk_size}
Prepared._CHECKS = {"prepare_ns": _int(0, _INT64[1])}
Round._CHECKS = {"runs": _runs}
Migrate._CHECKS = {
    "state": _plain_map(allow_float=False),
    "strategy": _strategy,
    "memory_size": _memory_size,
    "chunk_size": _chunk_size,
    "runs": _runs,
}
def _buffer(value: Any, limits: Limits, where: str) -> None:
    try:
        view = memoryview(value)
    except TypeError:
        raise FieldError(f"{where}: expected a bytes-like buffer, got {type(value).__name__}") from None
    if not view.c_contiguous:
        raise FieldError(f"{where}: the buffer is not contiguous")


MemoryChunk._CHECKS = {"offset": _int(0, _UINT64_MAX), "data": _buffer}
Commit._CHECKS = {"tag": _bytes(MEMORY_TAG_SIZE)}
Report._CHECKS = {"report": _plain_map(allow_float=True)}
Error._CHECKS = {"code": _text(32, r"[a-z][a-z0-9_]*"), "message": _text(MAX_TEXT)}
Bye._CHECKS = {}

MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Auth,
        ClockSyncRequest,
        ClockSyncReply,
        Prepare,
        Prepared,
        Round,
        Migrate,
        MemoryChunk,
        Commit,
        Report,
        Error,
        Bye,
    )
}


for _cls in MESSAGE_TYPES.values():
    _cls._FIELDS = tuple((key, check, f"{_cls.TYPE.upper()}.{key}") for key, check in _cls._CHECKS.items())
    _cls._KEYS = frozenset(_cls._CHECKS) | {"type"}
    assert [f.name for f in fields(_cls)] == list(_cls._CHECKS), _cls  # type: ignore[arg-type]


def name_of(message: Message | type[Message]) -> str:
    """The message's name as errors and docs write it: ``MIGRATE``, ``CLOCK_REQUEST``."""
    return message.TYPE.upper()


def validate(message: Message, limits: Limits) -> None:
    """Check every field of ``message``; FieldError (or LimitError) naming the field."""
    if MESSAGE_TYPES.get(getattr(message, "TYPE", None)) is not type(message):  # type: ignore[arg-type]
        raise FieldError(f"{type(message).__name__} is not a protocol message")
    for key, check, where in message._FIELDS:
        check(getattr(message, key), limits, where)


def from_wire(obj: Any, limits: Limits) -> Message:
    """Build a message from a decoded msgpack map, checking type, keys and every field."""
    if not isinstance(obj, dict):
        raise FieldError(f"message is a {type(obj).__name__}, not a map")
    kind = obj.get("type")
    if type(kind) is not str:
        raise FieldError(f"message has no str 'type' (got {kind!r})")
    cls = MESSAGE_TYPES.get(kind)
    if cls is None:
        raise FieldError(f"unknown message type {kind[:64]!r}")
    expected = cls._KEYS
    if obj.keys() != expected:
        missing = sorted(expected - obj.keys())
        extra = sorted(repr(k)[:64] for k in obj.keys() - expected)
        raise FieldError(f"{name_of(cls)}: missing keys {missing}, unexpected keys {extra}")
    values = {k: v for k, v in obj.items() if k != "type"}
    message = cls(**values)
    validate(message, limits)
    return message
