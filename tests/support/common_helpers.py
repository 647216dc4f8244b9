"""What the tests of every area share: the test key, the venv's console scripts, open descriptors."""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: The pre-shared key of every test that needs one (sessions, key files, fuzzing): 32 bytes.
PSK = b"a pre-shared key of 32 bytes...."
#: The installed console scripts (source-agent, dest-agent, kvm-probe), next to this interpreter.
BIN = Path(sys.executable).parent


def open_fds() -> int:
    """This process's open descriptors: a leak check counts them before and after."""
    return len(os.listdir("/proc/self/fd"))
