"""Loading the pre-shared key from a file, with the checks both agents need.

The key is the file's content with surrounding whitespace stripped (so an
editor's trailing newline does not change it).  A key anyone on the host can
read authenticates nothing, and a short one can be guessed: both are refused
with a message saying what to fix, rather than silently weakening the session.
"""

from __future__ import annotations

import os
import stat

__all__ = ["MIN_PSK_SIZE", "KeyFileError", "load_psk"]

#: Shortest key accepted from a file, in bytes after stripping.
MIN_PSK_SIZE = 16
#: Largest key file read (a key is short; a huge file is a mistake).
MAX_KEY_FILE_SIZE = 64 * 1024


class KeyFileError(Exception):
    """Raised when a key file cannot be read or its key is too weak to use."""


def load_psk(path: str | os.PathLike[str]) -> bytes:
    """The key in ``path``; KeyFileError naming the file and the reason otherwise.

    The permissions are checked on the opened file itself (fstat), so the file
    checked is the file read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise KeyFileError(f"key file {os.fspath(path)}: cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key file {os.fspath(path)}: not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"key file {os.fspath(path)}: mode {stat.S_IMODE(st.st_mode):04o} lets group or "
                f"others read or write it; run: chmod 600 {os.fspath(path)}"
            )
        data = os.read(fd, MAX_KEY_FILE_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE_SIZE:
        raise KeyFileError(f"key file {os.fspath(path)}: larger than {MAX_KEY_FILE_SIZE} bytes")
    key = data.strip()
    if len(key) < MIN_PSK_SIZE:
        raise KeyFileError(
            f"key file {os.fspath(path)}: key is {len(key)} bytes, at least {MIN_PSK_SIZE} are "
            f"needed (e.g. head -c 32 /dev/urandom | base64 > {os.fspath(path)})"
        )
    return key
