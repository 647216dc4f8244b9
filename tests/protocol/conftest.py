"""Fixtures shared by the protocol tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from protocol_helpers import connected

from protocol import Channel


@pytest.fixture(params=["memory", "socket"])
async def channels(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Channel, Channel]]:
    """Two authenticated channels, source and destination, over a memory stream (the generic
    path) and over a socket pair (the fd path); closed after the test."""
    source, destination = await connected(request.param)
    yield source, destination
    await source.aclose()
    await destination.aclose()
