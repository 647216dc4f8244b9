"""The bottom of kvmcore's data layer: plain (msgpack-ready) values, checked exactly.

Every document that crosses the wire -- VmState, Snapshot, RestoreRecord, a peer's
HostCapabilities -- is validated with these few checkers, so each refusal names
the field in the same words. Kernel structs are converted and checked by walking
their cffi types: the wire form follows the compiler-checked layout with no
hand-written field lists. Nothing here knows any document; every document's
module builds on this one.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from typing import Any

from ._kvm import ffi
from .errors import StateError

U64 = (0, (1 << 64) - 1)


# --- cdata <-> plain, driven by the cffi type ---

_converters: dict[Any, Any] = {}


def _converter(ctype: Any) -> Any:
    """A function turning cdata of ``ctype`` into plain data, built once per type
    (capture converts kvm_sregs and kvm_fpu every time: this keeps it cheap)."""
    conv = _converters.get(ctype)
    if conv is not None:
        return conv
    if ctype.kind == "struct":
        fields = [(name, None if f.type.kind == "primitive" else _converter(f.type))
                  for name, f in ctype.fields]

        def conv(obj: Any) -> Any:
            return {name: getattr(obj, name) if sub is None else sub(getattr(obj, name))
                    for name, sub in fields}
    elif ctype.kind == "array" and ctype.item.kind == "primitive" \
            and ffi.sizeof(ctype.item) == 1:
        def conv(obj: Any) -> Any:
            return bytes(ffi.buffer(obj))
    elif ctype.kind == "array":
        item = None if ctype.item.kind == "primitive" else _converter(ctype.item)

        def conv(obj: Any) -> Any:
            return [x if item is None else item(x) for x in obj]
    else:
        raise TypeError(f"no plain form for {ctype.cname}")
    _converters[ctype] = conv
    return conv


def cdata_to_plain(obj: Any) -> Any:
    """Struct -> dict, byte array -> bytes, other array -> list, integers as they are."""
    if not isinstance(obj, ffi.CData):
        return obj  # cffi already returned an integer field as a Python int
    return _converter(ffi.typeof(obj))(obj)


def struct_to_plain(ptr: Any) -> dict[str, Any]:
    """A ``struct X *`` from an ioctl, as a dict."""
    return cdata_to_plain(ptr[0])


def check_ctype(ctype: Any, plain: Any, path: str) -> None:
    """Validate ``plain`` against a cffi struct/array/integer type."""
    if isinstance(ctype, str):
        ctype = ffi.typeof(ctype)
    if ctype.kind == "struct":
        check_record(plain, path, {name: f.type for name, f in ctype.fields})
    elif ctype.kind == "array":
        if ctype.item.kind == "primitive" and ffi.sizeof(ctype.item) == 1:
            check_bytes(plain, path, ctype.length)
            return
        if not isinstance(plain, list) or len(plain) != ctype.length:
            raise StateError(path, f"expected a list of {ctype.length}, got {describe(plain)}")
        for i, item in enumerate(plain):
            check_ctype(ctype.item, item, f"{path}[{i}]")
    else:
        size = ffi.sizeof(ctype)
        signed = int(ffi.cast(ctype, -1)) < 0
        lo, hi = ((-(1 << (8 * size - 1)), (1 << (8 * size - 1)) - 1) if signed
                  else (0, (1 << (8 * size)) - 1))
        check_int(plain, path, lo, hi)


def plain_to_struct(ctype: str, plain: dict[str, Any]) -> Any:
    """A new ``struct X *`` filled from a validated dict."""
    return ffi.new(ctype + " *", plain)


# --- the small schema language for the rest ---

def describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def check_int(value: Any, path: str, lo: int = U64[0], hi: int = U64[1]) -> None:
    # bool is an int subclass; a bool where a number belongs is a type error.
    if not isinstance(value, int) or isinstance(value, bool):
        raise StateError(path, f"expected an integer, got {describe(value)}")
    if not lo <= value <= hi:
        raise StateError(path, f"{value} outside [{lo}, {hi}]")


def check_bytes(value: Any, path: str, length: int | None = None) -> None:
    """Bytes (of ``length``, when given; a document checks a free length itself)."""
    if not isinstance(value, bytes):
        raise StateError(path, f"expected bytes, got {describe(value)}")
    if length is not None and len(value) != length:
        raise StateError(path, f"expected {length} bytes, got {len(value)}")


def check_record(value: Any, path: str, spec: dict[str, Any]) -> None:
    """Exact keys; each value checked by its spec (a checker, a cffi type or a dict)."""
    if not isinstance(value, dict):
        raise StateError(path, f"expected a dict, got {describe(value)}")
    for key in spec:
        if key not in value:
            raise StateError(f"{path}.{key}", "missing")
    for key in value:
        if key not in spec:
            raise StateError(f"{path}.{key}", "unexpected field")
    for key, sub in spec.items():
        where = f"{path}.{key}"
        if isinstance(sub, dict):
            check_record(value[key], where, sub)
        elif callable(sub):
            sub(value[key], where)
        else:
            check_ctype(sub, value[key], where)


def optional(spec: Any) -> Any:
    """``spec`` or None (a feature the source host lacked)."""
    def check_optional(value: Any, path: str) -> None:
        if value is None:
            return
        if isinstance(spec, dict):
            check_record(value, path, spec)
        elif callable(spec):
            spec(value, path)
        else:
            check_ctype(spec, value, path)
    return check_optional


def check_u64(value: Any, path: str) -> None:
    check_int(value, path)


def check_bool(value: Any, path: str) -> None:
    if not isinstance(value, bool):
        raise StateError(path, f"expected a bool, got {describe(value)}")


def check_timings(value: Any, path: str) -> None:
    if not isinstance(value, dict):
        raise StateError(path, f"expected a dict, got {describe(value)}")
    for key, ns in value.items():
        if not isinstance(key, str):
            raise StateError(path, f"key {key!r} is not a string")
        check_int(ns, f"{path}.{key}")


def check_str(value: Any, path: str) -> None:
    if not isinstance(value, str):
        raise StateError(path, f"expected a string, got {describe(value)}")


def list_of(item: Callable[[Any, str], None]) -> Callable[[Any, str], None]:
    """A list whose every element passes ``item``."""
    def check_list(value: Any, path: str) -> None:
        if not isinstance(value, list):
            raise StateError(path, f"expected a list, got {describe(value)}")
        for i, element in enumerate(value):
            item(element, f"{path}[{i}]")
    return check_list


def one_of(names: typing.Collection[str]) -> Callable[[Any, str], None]:
    """A string that is one of ``names`` (a flag name the kernel defines)."""
    def check_name(value: Any, path: str) -> None:
        check_str(value, path)
        if value not in names:
            raise StateError(path, f"{value!r} is not one of {', '.join(sorted(names))}")
    return check_name


_CHECK_FOR_TYPE: dict[Any, Callable[[Any, str], None]] = {
    bool: check_bool, int: check_u64, str: check_str, bytes: check_bytes}


def _checker_for_hint(hint: Any, where: str) -> Callable[[Any, str], None]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _CHECK_FOR_TYPE:
        return _CHECK_FOR_TYPE[hint]
    if isinstance(hint, type) and hasattr(hint, "from_plain"):
        return lambda value, path: hint.from_plain(value, path)   # a nested document
    if origin is list and len(args) == 1:
        return list_of(_checker_for_hint(args[0], where))
    if origin is dict and args == (str, int):
        return check_timings
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return optional(_checker_for_hint(next(a for a in args if a is not type(None)), where))
    raise TypeError(f"{where}: no wire check for the type {hint!r}")


#: A dataclass field's metadata key for a check its type hint cannot say (a cffi struct's
#: fields, a grammar): ``field(metadata={CHECK: spec})``, spec as check_record takes it.
CHECK = "wire_check"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _added(cls: type) -> dict[str, bool]:
    return {f.name: bool(f.metadata.get(ADDED)) for f in dataclasses.fields(cls)}


@functools.cache
def dataclass_spec(cls: type) -> dict[str, Any]:
    """The checkers of a dataclass's fields, from its type hints (bool, int as u64, str,
    list[X], dict[str, int], X | None, a nested document with its own ``from_plain``) or
    the field's ``CHECK`` metadata, so a document's fields and their wire checks cannot
    drift apart."""
    hints = _hints(cls)
    return {f.name: f.metadata[CHECK] if CHECK in f.metadata
            else _checker_for_hint(hints[f.name], f"{cls.__name__}.{f.name}")
            for f in dataclasses.fields(cls)}


#: A dataclass field's metadata key for a field added to a document after peers that lack
#: it were written: absent from the wire, it takes its default (``field(default=0,
#: metadata={ADDED: True})``); every other field must be present.
ADDED = "wire_added"


def dataclass_from_plain(cls: type, plain: Any, path: str) -> Any:
    """An instance of ``cls`` from its wire form, checked exactly by dataclass_spec (every
    field but an ADDED one, no other; StateError names the field); nested documents are
    built by their own ``from_plain``, so ``to_plain = dataclasses.asdict`` round-trips."""
    spec = dataclass_spec(cls)
    if isinstance(plain, dict):
        spec = {name: check for name, check in spec.items()
                if name in plain or not _added(cls).get(name)}
    check_record(plain, path, spec)
    hints = _hints(cls)
    values = {}
    for name, value in plain.items():
        hint = hints[name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and value is not None:
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        nested = isinstance(hint, type) and hasattr(hint, "from_plain") and value is not None
        values[name] = hint.from_plain(value, f"{path}.{name}") if nested else value
    return cls(**values)
