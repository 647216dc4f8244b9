"""What a peer sends is checked field by field: a malformed peer is exit 3 with one line naming
the field; the testbed's own bugs are exit 4 with the traceback in a file, never exit 1."""

from __future__ import annotations

import dataclasses
import os

import pytest
import trio
from agents_helpers import BIN, PSK, key_file, settle

from dest_agent import AGENT_VERSION, DestinationServer, ServerConfig
from kvmcore import HostCapabilities, StateError


@pytest.mark.parametrize("field, value, words", [
    ("adjust_clock_flags", 0, "expected a list"),
    ("adjust_clock_flags", ["REALTIME", 7], "expected a string"),
    ("get_clock_flags", ["SUNDIAL"], "is not one of"),
    ("tsc_khz", "fast", "expected an integer"),
    ("tsc_khz", -1, "outside"),
    ("master_clock", 1, "expected a bool"),
    ("clock_guest", "yes", "expected a bool"),
    ("kernel_release", None, "expected a string"),
    ("xen_hvm", {"SHARED_INFO": 1}, "expected a list"),
])
def test_capabilities_from_plain_checks_every_type(caps, field, value, words):
    plain = caps.to_plain() | {field: value}
    with pytest.raises(StateError) as info:
        HostCapabilities.from_plain(plain)
    assert info.value.field.startswith(f"capabilities.{field}") and words in info.value.reason


def test_capabilities_round_trip_and_optional_fields(caps):
    assert HostCapabilities.from_plain(caps.to_plain()) == caps
    unknown = caps.to_plain() | {"clock_guest": None}
    assert HostCapabilities.from_plain(unknown).clock_guest is None
    for broken in ({k: v for k, v in caps.to_plain().items() if k != "tsc_khz"},
                   caps.to_plain() | {"extra": 1}, ["not", "a", "dict"]):
        with pytest.raises(StateError):
            HostCapabilities.from_plain(broken)


async def migrate_cli(tmp_path, port: int, *args: str) -> trio.CompletedProcess:
    key = key_file(tmp_path / "key")
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg"),
           "XDG_STATE_HOME": str(tmp_path / "state")}
    return await trio.run_process(
        [str(BIN / "source-agent"), "migrate", "--to", f"127.0.0.1:{port}", "--psk-file",
         str(key), "--warmup", "0ms", "--no-db", *args],
        capture_stdout=True, capture_stderr=True, check=False, env=env)


async def test_a_destination_with_malformed_capabilities_is_exit_3_naming_the_field(
        nursery, kvm, caps, tmp_path):
    """Issue 10 item 6: ``adjust_clock_flags: 0`` in the destination's HELLO used to crash
    `source-agent migrate` with a TypeError traceback and exit 1."""
    bad = dataclasses.replace(caps, adjust_clock_flags=0)
    srv = DestinationServer(kvm, bad, ServerConfig(psk=PSK, port=0), AGENT_VERSION)
    await nursery.start(srv.serve)
    done = await migrate_cli(tmp_path, srv.address[1])
    stderr = done.stderr.decode()
    assert done.returncode == 3, stderr
    assert "capabilities.adjust_clock_flags" in stderr and "expected a list" in stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    await settle(srv)
    assert srv.counters.vms_created == 0


def test_an_internal_error_is_exit_4_with_the_traceback_in_a_file(tmp_path, monkeypatch, capsys):
    import source_agent.cli as source_cli

    def bug(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    monkeypatch.setattr(source_cli, "plan_from_args", bug)
    assert source_cli.main(["loopback", "--no-db"]) == 4
    line = capsys.readouterr().err.strip()
    assert line.startswith("source-agent: internal error") and "ZeroDivisionError: a bug" in line
    assert "\n" not in line
    [written] = (tmp_path / "kvm-testbed" / "tracebacks").iterdir()
    assert str(written) in line and "Traceback" in written.read_text()


def test_dest_agent_internal_error_is_exit_4(tmp_path, monkeypatch, capsys):
    import dest_agent.cli as dest_cli

    def bug(args):
        raise KeyError("a bug")

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    monkeypatch.setattr(dest_cli, "config_from_args", bug)
    assert dest_cli.main(["serve"]) == 4
    err = capsys.readouterr().err
    assert err.startswith("dest-agent: internal error") and "traceback in" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("tool", ["source-agent", "dest-agent"])
def test_version(cli, tool):
    run = cli(tool, "--version")
    assert run.code == 0 and run.stdout.strip() == f"{tool} {AGENT_VERSION}"


def test_the_sweep_subcommand_internal_error_is_exit_4(tmp_path, monkeypatch, capsys):
    import source_agent.cli as source_cli
    import source_agent.sweep.cli as sweep_cli

    def bug(args):
        raise RuntimeError("a sweep bug")

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    monkeypatch.setattr(sweep_cli, "plan_from_args", bug)
    assert source_cli.main(["sweep", "s", "--db", str(tmp_path / "runs.db")]) == 4
    err = capsys.readouterr().err
    assert "internal error" in err and "RuntimeError: a sweep bug" in err and "Traceback" not in err
