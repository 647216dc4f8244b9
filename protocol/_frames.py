"""Frame layout and the bounded msgpack codec.

A frame is ``length:u32be || body || tag``.  ``length`` counts the body and
the tag; ``tag`` is empty until the sender has sent its AUTH and 16 bytes
(a truncated HMAC-SHA256, see `_auth.FrameMac`) after that.  The body is
one msgpack map.  ``length`` is checked against `Limits.max_frame_size`
before the body is waited for, and the decoder is told the container
limits, so a peer cannot make this side allocate more than the limits say.

MEMORY bodies have one fixed layout (offset always uint64, data always
bin32, data last) so that both sides can find the data without decoding it:
the sender writes the header and hands the caller's buffer to the stream
as is, the receiver copies the data straight into the caller's buffer.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

import msgpack

from ._errors import FieldError, LimitError
from ._limits import Limits

__all__ = [
    "LENGTH",
    "MEMORY_HEADER_SIZE",
    "FieldError",
    "LimitError",
    "check_plain",
    "memory_header",
    "pack",
    "parse_memory_header",
    "unpack",
]

LENGTH = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")


# One Packer for every message: msgpack.packb builds a new one per call, which
# costs more than packing a small message (2.2 vs 0.8 us here).  Packer.pack
# holds the GIL throughout and empties its buffer on errors too.
_PACKER = msgpack.Packer(use_bin_type=True)


def pack(obj: dict[str, Any]) -> bytes:
    """Encode one message map (strings as str, bytes as bin)."""
    packed: bytes = _PACKER.pack(obj)
    return packed


def _unpack_options(limits: Limits) -> dict[str, Any]:
    """The decoder settings every body is read with: str keys only, container bounds."""
    return {"raw": False, "strict_map_key": True, "use_list": True,
            "max_array_len": limits.max_container_entries,
            "max_map_len": limits.max_container_entries}


def _pairs_to_dict(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    # A map with a repeated key is ambiguous (which value wins?): refuse it
    # rather than silently keep one.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise FieldError("map has a repeated key")
    return result


def unpack(body: bytes | memoryview, limits: Limits) -> Any:
    """Decode exactly one msgpack object, bounded by ``limits``; FieldError on anything wrong."""
    try:
        if body and 0x80 <= body[0] <= 0x8F:
            # A small map (every message but a large HELLO, MIGRATE or REPORT):
            # decoded without the Python pairs hook, its repeated keys are
            # found by counting; only a map holding containers is decoded
            # again with the hook, which sees repeated keys at every depth.
            obj = msgpack.unpackb(body, **_unpack_options(limits))
            if type(obj) is not dict:  # pragma: no cover - a fixmap header decodes to a dict
                raise FieldError("not valid msgpack: expected a map")
            if len(obj) != body[0] & 0x0F:
                raise FieldError("map has a repeated key")
            for value in obj.values():
                if type(value) is dict or type(value) is list:
                    break
            else:
                return obj
        return msgpack.unpackb(body, **_unpack_options(limits), object_pairs_hook=_pairs_to_dict)
    except FieldError:
        raise
    except msgpack.StackError as exc:
        raise LimitError(f"nesting deeper than the decoder allows ({exc})") from None
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        text = str(exc) or type(exc).__name__
        if "exceeds max_" in text:
            raise LimitError(f"container too large: {text}") from None
        raise FieldError(f"not valid msgpack: {text}") from None


_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1
_SCALARS = (int, str, bytes, bool, type(None))
_SCALARS_FLOAT = (*_SCALARS, float)


def check_plain(value: Any, limits: Limits, *, allow_float: bool, where: str) -> None:
    """Check that ``value`` is a map of plain values within the nesting and entry limits.

    Plain means: maps with str keys, lists, and int, bytes, str, bool, None
    (and float where ``allow_float``).  ``where`` names the field in errors.
    """
    if not isinstance(value, dict):
        raise FieldError(f"{where}: expected a map, got {type(value).__name__}")
    scalars = _SCALARS_FLOAT if allow_float else _SCALARS
    # Iterative walk: the depth limit, not Python's recursion limit, decides.
    stack: list[tuple[Any, str, int]] = [(value, where, 2)]
    total = 0
    while stack:
        node, path, depth = stack.pop()
        if depth > limits.max_depth:
            raise LimitError(f"{path}: nested deeper than {limits.max_depth}")
        items: Iterable[tuple[Any, Any]] = node.items() if isinstance(node, dict) else enumerate(node)
        total += len(node)
        if total > limits.max_total_entries:
            raise LimitError(f"{where}: more than {limits.max_total_entries} entries in all")
        if len(node) > limits.max_container_entries:
            raise LimitError(f"{path}: more than {limits.max_container_entries} entries")
        for key, item in items:
            if type(key) is not str and isinstance(node, dict):
                raise FieldError(f"{path}: map key {key!r} is not a str")
            if isinstance(item, (dict, list)):
                stack.append((item, f"{path}[{key!r}]", depth + 1))
            elif not isinstance(item, scalars):
                raise FieldError(f"{path}[{key!r}]: {type(item).__name__} is not a plain value")
            elif type(item) is int and not _INT_MIN <= item <= _INT_MAX:
                raise FieldError(f"{path}[{key!r}]: {item} does not fit msgpack's 64-bit integers")


# MEMORY body: {"type": "memory", "offset": <uint64>, "data": <bin32>} in this order.
_MEMORY_PREFIX = (
    b"\x83" + pack("type") + pack("memory") + pack("offset")  # type: ignore[arg-type]
)
_DATA_KEY = pack("data")  # type: ignore[arg-type]
MEMORY_HEADER_SIZE = len(_MEMORY_PREFIX) + 9 + len(_DATA_KEY) + 5
_OFFSET_AT = len(_MEMORY_PREFIX)
_DATA_KEY_AT = _OFFSET_AT + 9
_SIZE_AT = _DATA_KEY_AT + len(_DATA_KEY)


def memory_header(offset: int, size: int) -> bytes:
    """The body bytes of a MEMORY message that precede its ``size`` data bytes."""
    return b"".join(
        (_MEMORY_PREFIX, b"\xcf", _U64.pack(offset), _DATA_KEY, b"\xc6", _U32.pack(size))
    )


def parse_memory_header(body: memoryview, *, partial: bool = False) -> tuple[int, int] | None:
    """Return ``(offset, size)`` if ``body`` is a MEMORY message, else None.

    FieldError if it starts like a MEMORY message but does not follow the
    fixed layout exactly (its data must run to the end of the body, unless
    ``partial``: then ``body`` may be only the header and what follows).
    """
    if not body or body[0] != 0x83 or body[:_OFFSET_AT] != _MEMORY_PREFIX:
        return None
    if (
        len(body) < MEMORY_HEADER_SIZE
        or body[_OFFSET_AT] != 0xCF
        or body[_DATA_KEY_AT:_SIZE_AT] != _DATA_KEY
        or body[_SIZE_AT] != 0xC6
    ):
        raise FieldError("MEMORY message not in its fixed layout (uint64 offset, bin32 data last)")
    (offset,) = _U64.unpack_from(body, _OFFSET_AT + 1)
    (size,) = _U32.unpack_from(body, _SIZE_AT + 1)
    if not partial and size != len(body) - MEMORY_HEADER_SIZE:
        raise FieldError(
            f"MEMORY data length {size} disagrees with the frame ({len(body) - MEMORY_HEADER_SIZE})"
        )
    return offset, size
