"""Fixtures for the robustness tests: agents as real processes, killed and reaped on every exit path."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The agents' tests' helpers (the key, key files, settle) are shared, not copied.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "agents"))

from agents_helpers import PSK, key_file  # noqa: E402
from robustness_helpers import Agent, DestAgent  # noqa: E402

from kvmcore import HostCapabilities, System, probe  # noqa: E402


@pytest.fixture(scope="session")
def caps() -> HostCapabilities:
    with System() as kvm:
        return probe(kvm)


@pytest.fixture
def kvm() -> Iterator[System]:
    with System() as system:
        yield system


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
