#!/usr/bin/env python3
"""The pair: two lane machines migrating between each other (`./dev pair`; tools/xen_pair/)."""
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from xen_pair.cli import main  # noqa: E402

if __name__ == "__main__":
    for sig in (signal.SIGTERM, signal.SIGHUP):  # unwind, so QEMU is stopped
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
