"""The fixtures every test directory shares, as a pytest plugin (``-p testbed_fixtures`` in
pyproject.toml) rather than a tests/conftest.py.

Why not a conftest: under pytest's default import mode a conftest in tests/ puts tests/ itself
first on sys.path, and tests/kvmcore and tests/protocol would then be imported as empty
namespace packages in place of the installed kvmcore and protocol.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from kvmcore import HostCapabilities, System, probe
from source_agent.netem import _ip


@pytest.fixture(scope="session")
def caps() -> HostCapabilities:
    """What this host's kernel can do, probed once (on the real /dev/kvm)."""
    with System() as kvm:
        return probe(kvm)


@pytest.fixture
def kvm() -> Iterator[System]:
    """/dev/kvm, opened for one test and closed after it."""
    with System() as system:
        yield system


@pytest.fixture(autouse=True)
def no_namespace_left_behind() -> Iterator[None]:
    """Every test: no network namespace of this process's survives it (netem, the sweeps and the
    agents make namespaces; a namespace left behind outlives the run and holds its processes)."""
    yield
    mine = [n for n in _ip.namespaces() if n.startswith(f"{_ip.PREFIX}{os.getpid()}-")]
    assert mine == [], f"namespaces left behind: {mine}"
