"""Configurable bounds on everything a peer can make this side allocate."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KiB", "MiB", "GiB", "PAGE_SIZE", "Limits"]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
PAGE_SIZE = 4096

# Bytes a MEMORY frame adds around its data: length prefix, msgpack header
# (map, keys, offset as uint64, bin32 header) and the frame MAC.
MEMORY_FRAME_OVERHEAD = 64


@dataclass(frozen=True)
class Limits:
    """Upper bounds enforced on what the peer sends, before anything is allocated.

    The defaults are safe for a host exposed to an untrusted network: a frame
    is read only after its length prefix has been checked against
    ``max_frame_size``, and the msgpack decoder is told the container bounds
    so that a small frame cannot expand into a huge object graph.  The
    destination caps guest memory per session with ``max_memory_size``.
    """

    #: Largest frame (length prefix value, body and MAC) accepted.
    max_frame_size: int = 8 * MiB
    #: Largest frame accepted before the peer has proved the key (its HELLO and AUTH): a
    #: stranger who can reach the port must not make this side buffer and decode megabytes.
    max_unauthenticated_frame_size: int = 64 * KiB
    #: Largest number of entries in any one array or map.
    max_container_entries: int = 65536
    #: Largest number of values (all containers and scalars) in one message.
    max_total_entries: int = 1_000_000
    #: Deepest nesting of arrays and maps, the message's own map counting as 1.
    max_depth: int = 32
    #: Largest guest memory a MIGRATE may announce.
    max_memory_size: int = 4 * GiB
    #: Largest MEMORY chunk; must fit in a frame with its header.
    max_chunk_size: int = 4 * MiB
    #: Most runs a MIGRATE may list (16 bytes each: 4 MiB at the default).
    max_memory_runs: int = 1 << 18
    #: Most CLOCK_SYNC exchanges between two other requests.
    max_clock_sync_rounds: int = 256

    @staticmethod
    def chunk_fitting(max_frame_size: int) -> int:
        """The largest MEMORY chunk (pages, at most the default ``max_chunk_size``) whose frame
        fits ``max_frame_size``: what a receiver configured by frame size alone accepts."""
        pages = (max_frame_size - MEMORY_FRAME_OVERHEAD) // PAGE_SIZE
        return max(PAGE_SIZE, min(Limits.max_chunk_size, pages * PAGE_SIZE))

    def __post_init__(self) -> None:
        for name in (
            "max_frame_size",
            "max_unauthenticated_frame_size",
            "max_container_entries",
            "max_total_entries",
            "max_depth",
            "max_memory_size",
            "max_chunk_size",
            "max_memory_runs",
            "max_clock_sync_rounds",
        ):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")
        if self.max_frame_size > 0xFFFFFFFF:
            raise ValueError("Limits.max_frame_size must fit the 32-bit length prefix")
        if self.max_frame_size < 64 * KiB:
            raise ValueError("Limits.max_frame_size below 64 KiB cannot carry a HELLO or a state")
        if self.max_chunk_size < PAGE_SIZE or self.max_chunk_size % PAGE_SIZE:
            raise ValueError(f"Limits.max_chunk_size must be a positive multiple of {PAGE_SIZE}")
        if self.max_chunk_size + MEMORY_FRAME_OVERHEAD > self.max_frame_size:
            raise ValueError("Limits.max_chunk_size plus its header must fit in max_frame_size")
