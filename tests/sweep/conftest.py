"""Fixtures for the sweep tests: the agent-layer doubles (the namespace guard is every test's)."""

from __future__ import annotations

import pytest
from fakes import FakeAgent, fake_dest_argv


@pytest.fixture
def agent():
    return FakeAgent()


@pytest.fixture
def dest_argv():
    return fake_dest_argv
