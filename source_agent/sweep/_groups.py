"""Let one real error out of a nursery as itself, not wrapped in an ExceptionGroup.

trio wraps whatever a nursery's tasks raise in a group (strict exception
groups). A sweep has exactly one thing that can go wrong at a time — the
destination died, a point's injector failed, the user pressed Ctrl-C — and the
command line must be able to ``except DestinationError`` to pick the exit code
and the message, so a group holding one error (plus cancellations it caused)
is collapsed to that error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


@contextmanager
def single_error() -> Iterator[None]:
    """Re-raise a group whose non-Cancelled leaves are one error as that error.

    "One error" includes the same failure seen twice (the destination's death,
    noticed by its supervisor and by the runner at once): the first is raised.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        real = [exc for exc in _leaves(group) if not isinstance(exc, trio.Cancelled)]
        if real and all(type(exc) is type(real[0]) and str(exc) == str(real[0]) for exc in real):
            raise real[0] from None
        raise
