"""Helpers for the agents' tests (and the robustness tests, which start agents too)."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from common_helpers import BIN, PSK, open_fds  # noqa: F401  (re-exported: the agents' tests import them from here)

from dest_agent import DestinationServer


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        return json.loads(self.stdout)


def run_cli(tool: str, *args: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 60) -> Run:
    """Run an installed console script (the venv's, next to this interpreter) in ``cwd``."""
    full_env = {**os.environ, "XDG_DATA_HOME": str(cwd / "xdg"), **(env or {})}
    proc = subprocess.run([str(BIN / tool), *args], cwd=cwd, env=full_env, capture_output=True,
                          check=False, text=True, timeout=timeout)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def key_file(path: Path, content: bytes = PSK, mode: int = 0o600) -> Path:
    path.write_bytes(content + b"\n")
    path.chmod(mode)
    return path


async def settle(server: DestinationServer, timeout: float = 10.0) -> None:
    """Wait (bounded) until the server has no live session."""
    with trio.fail_after(timeout):
        while server.counters.live_sessions:
            await trio.sleep(0.01)
