"""Addresses and errors that keep their reason (issue 10, items 14 and 17): IPv6 needs brackets
and says so, TLS failures name the file or the TLS reason, a keyless source is told to give a
key, a port that is not an agent gets a hint, local usage errors are exit 2 up front."""

from __future__ import annotations

import logging
import os
from functools import partial

import pytest
import trio
import trustme
from agents_helpers import BIN, PSK, key_file, settle

import protocol
from agentcore.options import UsageError, parse_host_port
from dest_agent import AGENT_VERSION, DestinationServer, ServerConfig


@pytest.mark.parametrize("text, hint", [
    ("::1:7440", "[::1]:7440"), ("::1", "[::1]:7400"), ("fe80::1", "[fe80::1]:7400"),
])
def test_an_unbracketed_ipv6_address_is_refused_with_the_form_to_type(text, hint):
    with pytest.raises(UsageError, match="brackets") as info:
        parse_host_port(text, default_port=7400)
    assert hint in str(info.value)
    # Controls: the bracketed forms and plain names parse.
    assert parse_host_port("[::1]:7440") == ("::1", 7440)
    assert parse_host_port("[::1]", default_port=7400) == ("::1", 7400)
    assert parse_host_port("localhost:1") == ("localhost", 1)


@pytest.mark.parametrize("tool, args", [
    ("source-agent", ["migrate", "--no-db", "--to", "::1:7440"]),
    ("dest-agent", ["serve", "--listen", "::1:7432"]),
])
def test_the_agents_refuse_an_unbracketed_ipv6_address(cli, tool, args):
    run = cli(tool, *args)
    assert run.code == 2 and "brackets" in run.stderr and "[::1]:74" in run.stderr


def test_too_many_clock_rounds_is_a_usage_error_before_anything_runs(cli):
    run = cli("source-agent", "loopback", "--no-db", "--clock-rounds", "100000")
    assert run.code == 2 and "--clock-rounds 100000: must be between 1 and 256" in run.stderr
    assert cli("source-agent", "loopback", "--no-db", "--clock-rounds", "0").code == 2
    control = cli("source-agent", "loopback", "--no-db", "--json", "--clock-rounds", "256")
    assert control.code == 0, control.stderr


@pytest.fixture
def tls(tmp_path) -> dict[str, str]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    files = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem",
             "other_ca": tmp_path / "other-ca.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    trustme.CA().cert_pem.write_to_path(str(files["other_ca"]))
    return {name: str(path) for name, path in files.items()}


def test_tls_set_up_errors_name_the_file(tls, tmp_path):
    missing = str(tmp_path / "no-such.pem")
    with pytest.raises(OSError, match="no-such.pem"):
        protocol.tls_client_context(missing)
    with pytest.raises(OSError, match="no-such.pem"):
        protocol.tls_server_context(tls["cert"], missing)
    with pytest.raises(ValueError, match=f"no PEM private key in {tls['cert']}"):
        protocol.tls_server_context(tls["cert"], tls["cert"])      # a certificate without key
    with pytest.raises(ValueError, match=f"CA certificates {tls['key']}"):
        protocol.tls_client_context(tls["key"])
    protocol.tls_server_context(tls["cert"], tls["key"], client_ca_file=tls["ca"])   # control


def test_dest_agent_names_the_missing_tls_file(cli, tls, tmp_path):
    run = cli("dest-agent", "serve", "--tls-cert", tls["cert"], "--tls-key",
              str(tmp_path / "gone.key"))
    assert run.code == 2 and "gone.key" in run.stderr and "No such file" in run.stderr


async def source_cli(tmp_path, port: int, *args: str) -> tuple[int, str]:
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg"),
           "XDG_STATE_HOME": str(tmp_path / "state")}
    done = await trio.run_process(
        [str(BIN / "source-agent"), "migrate", "--to", f"127.0.0.1:{port}", "--warmup", "0ms",
         "--no-db", "--connect-timeout", "5s", "--handshake-timeout", "5s", *args],
        capture_stdout=True, capture_stderr=True, check=False, env=env)
    return done.returncode, done.stderr.decode()


async def test_a_tls_failure_keeps_its_reason(nursery, kvm, caps, tls, tmp_path):
    """It used to end "broke while sending HELLO: " with nothing after it."""
    context = protocol.tls_server_context(tls["cert"], tls["key"])
    srv = DestinationServer(kvm, caps, ServerConfig(psk=PSK, port=0, ssl_context=context),
                            AGENT_VERSION)
    await nursery.start(srv.serve)
    key = str(key_file(tmp_path / "psk"))
    code, stderr = await source_cli(tmp_path, srv.address[1], "--psk-file", key,
                                    "--tls-ca", tls["other_ca"])
    assert code == 3 and "certificate verify failed" in stderr, stderr
    assert not stderr.rstrip().endswith(":")
    code, stderr = await source_cli(tmp_path, srv.address[1], "--psk-file", key,
                                    "--tls-ca", tls["ca"])
    assert code == 0, stderr                                      # control: the right CA
    await settle(srv)


async def test_a_source_without_a_key_is_told_to_give_one(server, tmp_path):
    code, stderr = await source_cli(tmp_path, server.address[1])
    assert code == 3 and "this source has no key: give --psk-file" in stderr, stderr
    wrong = str(key_file(tmp_path / "wrong", b"another-key-of-32-bytes-987654321"))
    code, stderr = await source_cli(tmp_path, server.address[1], "--psk-file", wrong)
    assert code == 3 and "refused the authentication" in stderr     # control: a wrong key
    assert "no key" not in stderr


async def test_a_port_that_is_not_an_agent_gets_a_hint(nursery, tmp_path):
    async def web_server(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(65536)
            await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    [listener] = await nursery.start(partial(trio.serve_tcp, web_server, 0, host="127.0.0.1"))
    code, stderr = await source_cli(tmp_path, listener.socket.getsockname()[1])
    assert code == 3 and "is the peer a destination agent of this testbed" in stderr, stderr


async def test_serving_without_a_key_warns_that_local_users_can_run_vms(nursery, kvm, caps,
                                                                        caplog):
    caplog.set_level(logging.INFO, logger="dest_agent")
    keyless = DestinationServer(kvm, caps, ServerConfig(psk=b"", port=0), AGENT_VERSION)
    await nursery.start(keyless.serve)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "any local user can make this host run VMs" in warnings[0].message
    caplog.clear()
    keyed = DestinationServer(kvm, caps, ServerConfig(psk=PSK, port=0), AGENT_VERSION)
    await nursery.start(keyed.serve)                                # control: with a key, none
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
