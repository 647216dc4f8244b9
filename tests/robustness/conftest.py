"""Fixtures for the robustness tests: agents as real processes, killed and reaped on every exit path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from agents_helpers import PSK, key_file
from robustness_helpers import Agent, DestAgent


@pytest.fixture
def key(tmp_path: Path) -> Path:
    return key_file(tmp_path / "key", PSK)


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[Agent]]:
    """Every process a test starts goes in here; all are SIGKILLed and reaped afterwards, and
    the test fails if one of them could not be (no process outlives its test)."""
    started: list[Agent] = []
    yield started
    for agent in started:
        agent.kill()
    assert all(a.proc.returncode is not None for a in started)


@pytest.fixture
def dest(tmp_path: Path, key: Path, agents: list[Agent]):
    """Start a destination agent with extra options; stopped (SIGTERM-free: SIGKILL) at teardown."""
    def start(*options: str, pause: str | None = None, name: str = "dest") -> DestAgent:
        agent = DestAgent(tmp_path, key, *options, pause=pause, name=name)
        agents.append(agent)
        return agent
    return start
