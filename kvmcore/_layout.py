"""The one rule for a guest's memory size, which every layer above checks against.

The guest maps its memory with one page directory of 2 MiB pages (kvmcore/guest_program/
and guest.py), so a size is a whole number of 2 MiB pages, at least what the
guest program's layout needs (abi.h) and at most 1 GiB.
"""

from __future__ import annotations

from ._kvm import lib

HUGE_PAGE = 2 << 20
MIN_MEMORY = lib.KVMCORE_MIN_MEMORY
MAX_MEMORY = 1 << 30              # one page directory of 2 MiB pages


def memory_size_problem(size: int) -> str | None:
    """Why ``size`` cannot be a guest's memory size, or None when it can."""
    if size % HUGE_PAGE or not MIN_MEMORY <= size <= MAX_MEMORY:
        return (f"{size:#x} is not a multiple of 2 MiB in [{MIN_MEMORY:#x}, {MAX_MEMORY:#x}]")
    return None
