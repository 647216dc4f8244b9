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
    """TLS for the destination; with ``client_ca_file`` the source must present a certificate.

    OSError names the file that cannot be read; ValueError names the files that do not make
    a certificate and its key (OpenSSL alone says "[SSL] PEM lib")."""
    _readable(certfile, keyfile, client_ca_file)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _load_chain(context, certfile, keyfile)
    if client_ca_file is not None:
        _load_ca(context, client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def tls_client_context(
    ca_file: str, *, certfile: str | None = None, keyfile: str | None = None
) -> ssl.SSLContext:
    """TLS for the source, trusting ``ca_file``; ``certfile``/``keyfile`` for mutual TLS.
    Errors as for tls_server_context."""
    _readable(ca_file, certfile, keyfile)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    _load_ca(context, ca_file)
    if certfile is not None:
        _load_chain(context, certfile, keyfile)
    return context


def _readable(*paths: str | None) -> None:
    """Open each file once: the OSError then names it (ssl's own errors do not)."""
    for path in paths:
        if path is not None:
            with open(path, "rb"):
                pass


def _load_chain(context: ssl.SSLContext, certfile: str, keyfile: str | None) -> None:
    try:
        context.load_cert_chain(certfile, keyfile)
    except ssl.SSLError as exc:
        key = keyfile or certfile
        with open(key, "rb") as f:
            has_key = b"PRIVATE KEY-----" in f.read(1 << 20)
        why = f"no PEM private key in {key}" if not has_key else exc.reason or str(exc)
        raise ValueError(f"certificate {certfile} with key {key}: {why} (each must be PEM, the "
                         "key the certificate's private key)") from None


def _load_ca(context: ssl.SSLContext, ca_file: str) -> None:
    try:
        context.load_verify_locations(ca_file)
    except ssl.SSLError as exc:
        raise ValueError(f"CA certificates {ca_file}: {exc.reason or exc} (expected PEM "
                         "certificates)") from None


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
