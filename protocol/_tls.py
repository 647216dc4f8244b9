"""Connecting: TCP, optionally TLS (mutual with client certificates), and the TLS contexts."""

from __future__ import annotations

import ssl
from typing import Any

import trio

from ._channel import Channel
from ._session import Session

__all__ = ["open_channel", "tls_client_context", "tls_server_context"]


def tls_server_context(
    certfile: str, keyfile: str, *, client_ca_file: str | None = None
) -> ssl.SSLContext:
    """TLS for the destination; with ``client_ca_file`` the source must present a certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    if client_ca_file is not None:
        context.load_verify_locations(client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def tls_client_context(
    ca_file: str, *, certfile: str | None = None, keyfile: str | None = None
) -> ssl.SSLContext:
    """TLS for the source, trusting ``ca_file``; ``certfile``/``keyfile`` for mutual TLS."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile)
    return context


async def open_channel(
    host: str,
    port: int,
    session: Session,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    **channel_options: Any,
) -> Channel:
    """Connect over TCP (and TLS if ``ssl_context``) and return a `Channel` for ``session``."""
    stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    if ssl_context is not None:
        stream = trio.SSLStream(stream, ssl_context, server_hostname=server_hostname or host)
    return Channel(stream, session, **channel_options)
