"""Fixtures for the agents' tests: real /dev/kvm, real TCP on 127.0.0.1, the real console scripts."""

from __future__ import annotations

from typing import Any

import pytest
from agents_helpers import PSK, Run, run_cli

from dest_agent import AGENT_VERSION, DestinationServer, ServerConfig


@pytest.fixture
def cli(tmp_path):
    def run(tool: str, *args: str, **kw: Any) -> Run:
        return run_cli(tool, *args, cwd=tmp_path, **kw)
    return run


@pytest.fixture
async def server(nursery, kvm, caps):
    """A destination agent in this trio run, on 127.0.0.1:<free port>, key PSK."""
    srv = DestinationServer(kvm, caps, ServerConfig(psk=PSK, port=0, handshake_timeout=5,
                                                    idle_timeout=5, message_timeout=5),
                            AGENT_VERSION)
    await nursery.start(srv.serve)
    yield srv
