"""Exit status 4 for the testbed's own bugs: one line on stderr, the traceback in a file.

Why: exit 1 means "a verdict failed" and scripts (sweeps, CI) act on it, so an
unexpected exception must never end a command with 1, nor bury the one line a
user needs under a traceback. The traceback is kept, in a file the line names,
for the bug report.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

from .options import EXIT_INTERNAL


def traceback_dir() -> Path:
    """``$XDG_STATE_HOME/kvm-testbed/tracebacks`` (``~/.local/state`` if unset)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "state")
    return Path(base) / "kvm-testbed" / "tracebacks"


def internal_error(prog: str, exc: BaseException) -> int:
    """Report ``exc`` as an internal error of ``prog``; returns EXIT_INTERNAL.

    The traceback goes to a new file under traceback_dir(); if that cannot be written,
    to stderr after the line (kept either way)."""
    text = "".join(traceback.format_exception(exc))
    summary = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    path = traceback_dir() / f"{prog}-{stamp}-{os.getpid()}.txt"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as write_error:
        print(f"{prog}: internal error (a bug in the testbed): {summary}; cannot write the "
              f"traceback to {path} ({write_error.strerror}), so it follows", file=sys.stderr)
        sys.stderr.write(text)
        return EXIT_INTERNAL
    print(f"{prog}: internal error (a bug in the testbed): {summary}; traceback in {path}",
          file=sys.stderr)
    return EXIT_INTERNAL
