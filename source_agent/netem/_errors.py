"""Every error the network-condition layer raises, in one screen.

One root (`NetemError`) so a sweep can catch "the injector failed" without
catching unrelated bugs; each leaf says exactly when it is raised.
"""

from __future__ import annotations


class NetemError(Exception):
    """Root of every error raised by `source_agent.netem`."""


class ImpairmentError(NetemError, ValueError):
    """A delay, jitter, rate or buffer value is malformed or out of range; the message names the field."""


class Unsupported(NetemError):
    """The host lacks a kernel feature this injector needs.

    The message always starts with ``"unsupported on this host: "`` followed by
    the feature and what the kernel or tool said, so a test can pass it
    straight to ``pytest.skip``.
    """


class CommandError(NetemError):
    """An ``ip`` or ``tc`` command exited non-zero; carries the argv, status and stderr."""

    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(f"{' '.join(argv)!r} exited {returncode}: {self.stderr or '(no stderr)'}")
