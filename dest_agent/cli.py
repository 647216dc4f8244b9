"""``dest-agent serve``: the command line over DestinationServer.

Refuses to start rather than serve unsafely: any address but loopback needs a
key file, and the key file itself must be private and long enough.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import trio

import protocol
from kvmcore import KvmError, System, probe
from agentcore.crash import internal_error
from agentcore.options import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    UsageError,
    argtype,
    parse_guest_memory,
    parse_host_port,
    parse_size,
    parse_timeout,
    seconds,
)

from . import AGENT_VERSION
from .server import DestinationServer, ServerConfig, is_loopback_host

EPILOG = """\
examples:
  dest-agent serve                                   # 127.0.0.1:7400, no key needed
  head -c 32 /dev/urandom | base64 > key && chmod 600 key
  dest-agent serve --listen 10.0.0.2:7400 --psk-file key --max-sessions 2 --max-memory 256MiB
  dest-agent serve --max-frame-size 2MiB --handshake-timeout 5s --idle-timeout 30s

Each connection is one session: HELLO, AUTH (the pre-shared key), clock sync, then
PREPARE (the VM made ahead), precopy ROUNDs, MIGRATE/memory/COMMIT -> restore -> REPORT.
No VM and no guest memory exist before the source has proved the key. One line per session is logged to stderr.
exit codes: 2 bad option or set-up (no /dev/kvm, key file refused, address in use),
4 internal error (a bug: one line names the file holding the traceback), 130 interrupted (Ctrl-C)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dest-agent", description="Destination agent of the KVM migration testbed.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {AGENT_VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="serve migrations until interrupted",
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                           description="Serve migrations: restore every guest a source sends.")
    serve.add_argument("--listen", default="127.0.0.1:7400", metavar="HOST:PORT",
                       type=argtype(lambda text: parse_host_port(text, default_port=7400)),
                       help="address to listen on (default 127.0.0.1:7400; any non-loopback "
                            "address requires --psk-file)")
    serve.add_argument("--psk-file", metavar="PATH",
                       help="pre-shared key file (mode 600, >= 16 bytes); without it, loopback "
                            "only and the empty key")
    serve.add_argument("--max-sessions", type=int, default=4, metavar="N",
                       help="concurrent sessions of sources that proved the key; more get "
                            "ERROR busy (default 4)")
    serve.add_argument("--max-unauthenticated", type=int, default=64, metavar="N",
                       help="connections that have not proved the key yet, counted apart from "
                            "sessions; more get ERROR busy (default 64)")
    serve.add_argument("--max-unauthenticated-per-address", type=int, default=8, metavar="N",
                       help="the same, from any one address (default 8)")
    serve.add_argument("--max-memory", type=argtype(parse_guest_memory), default=1 << 30,
                       metavar="SIZE", help="largest guest memory per session (default 1GiB)")
    serve.add_argument("--max-frame-size", type=argtype(parse_size), default=8 << 20,
                       metavar="SIZE", help="largest protocol frame accepted, 64KiB..4GiB; MEMORY "
                                            "chunks must fit in it (default 8MiB)")
    for name, default, what in (("handshake", "10s", "HELLO+AUTH must complete within"),
                                ("idle", "60s", "a message must begin within"),
                                ("message", "30s", "a message must complete within")):
        serve.add_argument(f"--{name}-timeout", type=argtype(parse_timeout), default=seconds(default),
                           metavar="DURATION", help=f"{what} this (default {default})")
    serve.add_argument("--max-run-time", type=argtype(seconds), default=seconds("10s"),
                       metavar="DURATION",
                       help="the restored guest must report within this, or its vCPU is "
                            "stopped and the source gets ERROR restore_failed (default 10s)")
    serve.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate")
    serve.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    serve.add_argument("--tls-client-ca", metavar="PEM",
                       help="require client certificates signed by this CA (mutual TLS)")
    serve.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Validate the options together; UsageError says what to change."""
    host, port = args.listen
    if args.psk_file is None:
        if not is_loopback_host(host):
            raise UsageError(f"--listen {host}:{port} is not a loopback address (not every "
                             "address it resolves to is): a pre-shared key is required there "
                             "(--psk-file PATH), or anyone who can reach the port could make "
                             "this host run VMs")
        psk = b""
    else:
        try:
            psk = protocol.load_psk(args.psk_file)
        except protocol.KeyFileError as exc:
            raise UsageError(str(exc)) from None
    for option in ("max_sessions", "max_unauthenticated", "max_unauthenticated_per_address"):
        if getattr(args, option) < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be at least 1")
    if not 64 << 10 <= args.max_frame_size < 4 << 30:
        raise UsageError("--max-frame-size must be between 64KiB (a HELLO or a state must fit) "
                         "and 4GiB (the 32-bit length prefix)")
    if not 0 < args.max_run_time <= 3600:
        raise UsageError("--max-run-time must be between 0 and 1h")
    ssl_context = None
    if args.tls_cert or args.tls_key or args.tls_client_ca:
        if not (args.tls_cert and args.tls_key):
            raise UsageError("TLS needs both --tls-cert and --tls-key")
        try:
            ssl_context = protocol.tls_server_context(args.tls_cert, args.tls_key,
                                                      client_ca_file=args.tls_client_ca)
        except (OSError, ValueError) as exc:
            raise UsageError(f"TLS set-up: {exc}") from None
    return ServerConfig(psk=psk, host=host, port=port, max_sessions=args.max_sessions,
                        max_unauthenticated=args.max_unauthenticated,
                        max_unauthenticated_per_address=args.max_unauthenticated_per_address,
                        max_memory=args.max_memory, max_frame_size=args.max_frame_size,
                        handshake_timeout=args.handshake_timeout,
                        idle_timeout=args.idle_timeout, message_timeout=args.message_timeout,
                        max_run_time=args.max_run_time, ssl_context=ssl_context)


async def serve(config: ServerConfig) -> None:
    with System() as kvm:
        caps = await trio.to_thread.run_sync(probe, kvm)
        await DestinationServer(kvm, caps, config, AGENT_VERSION).serve()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except Exception as exc:     # our bug, never a bare traceback: see agentcore.crash
        return internal_error("dest-agent", exc)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="dest-agent: %(message)s")
    try:
        config = config_from_args(args)
    except UsageError as exc:
        print(f"dest-agent: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        trio.run(serve, config)
    except BaseException as raised:
        # trio's nurseries wrap what ends the server in exception groups: unwrap the one cause.
        exc = raised
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if isinstance(exc, KeyboardInterrupt):
            print("dest-agent: interrupted, stopped serving", file=sys.stderr)
            return EXIT_INTERRUPTED
        if isinstance(exc, (KvmError, OSError, UsageError)):
            print(f"dest-agent: error: cannot serve: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise
    return 0
