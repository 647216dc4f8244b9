"""Fixtures for the sweep tests: the agent-layer doubles, a plan, and leak guards."""

from __future__ import annotations

import os

import pytest
from fakes import FakeAgent, fake_dest_argv

from source_agent.netem import _ip


@pytest.fixture(autouse=True)
def no_namespace_left_behind():
    """Every test: no namespace created by this process survives it."""
    yield
    mine = [n for n in _ip.namespaces() if n.startswith(f"{_ip.PREFIX}{os.getpid()}-")]
    assert mine == [], f"namespaces left behind: {mine}"


@pytest.fixture
def agent():
    return FakeAgent()


@pytest.fixture
def dest_argv():
    return fake_dest_argv
