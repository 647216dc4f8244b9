"""Fixtures for the agents' tests: real /dev/kvm, real TCP on 127.0.0.1, the real console scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from dest_agent import AGENT_VERSION, DestinationServer, ServerConfig
from kvmcore import HostCapabilities, System, probe

BIN = Path(sys.executable).parent
PSK = b"a-test-key-of-32-bytes-0123456789"


@pytest.fixture(scope="session")
def caps() -> HostCapabilities:
    with System() as kvm:
        return probe(kvm)


@pytest.fixture
def kvm(caps):
    with System() as system:
        system._caps = caps          # probe once per test session
        yield system


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


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
    proc = subprocess.run([str(BIN / tool), *args], cwd=cwd, env=full_env, capture_output=True, check=False,
                          text=True, timeout=timeout)
    return Run(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli(tmp_path):
    def run(tool: str, *args: str, **kw: Any) -> Run:
        return run_cli(tool, *args, cwd=tmp_path, **kw)
    return run


def key_file(path: Path, content: bytes = PSK, mode: int = 0o600) -> Path:
    path.write_bytes(content + b"\n")
    path.chmod(mode)
    return path


@pytest.fixture
async def server(nursery, kvm, caps):
    """A destination agent in this trio run, on 127.0.0.1:<free port>, key PSK."""
    srv = DestinationServer(kvm, caps, ServerConfig(psk=PSK, port=0, handshake_timeout=5,
                                                    idle_timeout=5, message_timeout=5),
                            AGENT_VERSION)
    await nursery.start(srv.serve)
    yield srv


async def settle(server: DestinationServer, timeout: float = 10.0) -> None:
    """Wait (bounded) until the server has no live session."""
    with trio.fail_after(timeout):
        while server.counters.live_sessions:
            await trio.sleep(0.01)
