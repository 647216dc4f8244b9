"""Unit tests of tools/xen_lane.py's pure parts (no download, no boot), each with a negative control."""
from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

GOOD_CONFIG = """\
#
# Automatically generated file; DO NOT EDIT.
CONFIG_KVM=m
CONFIG_KVM_AMD=m
CONFIG_KVM_XEN=y
CONFIG_NET_9P=m
CONFIG_NET_9P_VIRTIO=m
CONFIG_9P_FS=m
CONFIG_NET_SCH_NETEM=m
CONFIG_VETH=m
CONFIG_VIRTIO_NET=m
"""


def test_config_with_kvm_xen_is_accepted(lane_tool) -> None:
    assert lane_tool.check_kernel_config(GOOD_CONFIG) == {
        "kvm_amd": True, "9pnet_virtio": True, "9p": True, "sch_netem": True, "veth": True,
        "virtio_net": True}


def test_builtin_modules_need_no_loading(lane_tool) -> None:
    config = GOOD_CONFIG.replace("CONFIG_9P_FS=m", "CONFIG_9P_FS=y")
    assert lane_tool.check_kernel_config(config)["9p"] is False


@pytest.mark.parametrize("line, replacement, named", [
    ("CONFIG_KVM_XEN=y", "# CONFIG_KVM_XEN is not set", "CONFIG_KVM_XEN=y (found not set)"),
    ("CONFIG_KVM_XEN=y", "CONFIG_KVM_XEN=m", "CONFIG_KVM_XEN=y (found m)"),  # a bool: m is bogus
    ("CONFIG_NET_SCH_NETEM=m", "", "CONFIG_NET_SCH_NETEM=y or =m"),
    ("CONFIG_VIRTIO_NET=m", "", "CONFIG_VIRTIO_NET=y or =m"),  # the pair's link
])
def test_config_without_kvm_xen_is_refused(lane_tool, line: str, replacement: str, named: str) -> None:
    """Negative control: bookworm's own 6.1 lacks CONFIG_KVM_XEN; such a kernel is refused, by name."""
    with pytest.raises(lane_tool.LaneError, match=r"unsuitable for the Xen lane") as e:
        lane_tool.check_kernel_config(GOOD_CONFIG.replace(line, replacement))
    assert named in str(e.value)
    assert e.value.status == 2


CLEAN_CONSOLE = """\
SeaBIOS (version 1.16.2-debian-1.16.2-1)
Booting from ROM...
XENLANE-INIT uptime=3.99
XENLANE-BEGIN uptime=6.98
[    7.1] kvm_amd: TSC scaling supported
test_xen_capability.py::test_xen_hvm_capability PASSED
XENLANE-END status=0 uptime=8.31
[    8.441219] reboot: Power down
"""

OOPS_CONSOLE = """\
XENLANE-INIT uptime=3.12
[    3.401234] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI
[    3.401240] CPU: 1 UID: 0 PID: 0 Comm: swapper/1 Not tainted 6.12.95+deb12-amd64
[    3.401250] RIP: 0010:sched_clock_cpu+0x10/0x1a0
[    3.402000] Kernel panic - not syncing: Fatal exception in interrupt
"""


def test_oops_is_detected(lane_tool) -> None:
    assert lane_tool.find_oops(OOPS_CONSOLE) == "[    3.401234] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI"
    assert lane_tool.find_oops("[ 1.0] Kernel panic - not syncing: VFS: Unable to mount root")
    assert lane_tool.find_oops("[ 2.0] BUG: kernel NULL pointer dereference, address: 0000000000000008")
    assert lane_tool.find_oops("[ 2.0] general protection fault, probably for non-canonical address")


def test_clean_console_has_no_oops(lane_tool) -> None:
    """Negative control: a clean transcript (with words like 'PASSED' and 'Power down') is clean."""
    assert lane_tool.find_oops(CLEAN_CONSOLE) is None
    assert lane_tool.find_oops("[ 5.0] WARNING: CPU: 0 PID: 1 at arch/x86/kvm/x86.c:1 foo") is None


def test_console_line_drops_terminal_escapes(lane_tool) -> None:
    raw = b"\x1bc\x1b[?7l\x1b[2JXENLANE-INIT uptime=3.99\r"
    assert lane_tool.console_line(raw) == "XENLANE-INIT uptime=3.99"
    assert lane_tool.console_line(b"plain\r") == "plain"


def test_qemu_command_follows_the_recipe(lane_tool) -> None:
    argv = lane_tool.qemu_command(Path("/k/vmlinuz"), Path("/r/initrd"), Path("/res,ults"))
    joined = shlex.join(argv)
    assert argv[0] == "qemu-system-x86_64"
    for fragment in ("-accel tcg,thread=multi", "-cpu max", "-smp 2", "-m 2048", "-machine q35",
                     "-kernel /k/vmlinuz", "-initrd /r/initrd", "-no-reboot", "-nic none",
                     "path=/,security_model=none,readonly=on,multidevs=remap"):
        assert fragment in joined
    append = argv[argv.index("-append") + 1].split()
    assert {"console=ttyS0", "panic=-1", "oops=panic"} <= set(append)
    # The results share is writable, and a comma in its path (which would end QEMU's option
    # value) is doubled.
    results_share = next(a for a in argv if a.startswith("local,id=results,"))
    assert results_share == "local,id=results,path=/res,,ults,security_model=none,multidevs=remap"


def test_module_load_order_puts_dependencies_first(lane_tool) -> None:
    depends = {"kvm_amd": ["kvm", "ccp"], "kvm": ["irqbypass"], "ccp": [], "irqbypass": [],
               "9p": ["9pnet", "netfs"], "9pnet": ["netfs"], "netfs": [], "9pnet_virtio": ["9pnet"],
               "sch_netem": []}
    order = lane_tool.module_load_order(depends, ["kvm_amd", "9pnet_virtio", "9p", "sch_netem"])
    assert sorted(order) == sorted(depends)
    for module, deps in depends.items():
        assert all(order.index(d) < order.index(module) for d in deps)


def test_module_load_order_names_a_missing_module(lane_tool) -> None:
    with pytest.raises(lane_tool.LaneError, match="module ccp not found"):
        lane_tool.module_load_order({"kvm_amd": ["ccp"]}, ["kvm_amd"])
    with pytest.raises(lane_tool.LaneError, match="cycle"):
        lane_tool.module_load_order({"a": ["b"], "b": ["a"]}, ["a"])


def test_lane_environment(lane_tool, tmp_path: Path) -> None:
    host = {"PATH": "/venv/bin:/usr/bin", "PYTHONPATH": "/x", "KVM_TESTBED_SEED": "1",
            "KVM_TESTBED_RUN_LANE": "1", "SECRET_TOKEN": "no", "HOME": "/root"}
    env = lane_tool.lane_environment(host, tmp_path, Path("/cache/pyc"))
    assert env["KVM_TESTBED_LANE"] == "xen"
    assert env["PATH"] == "/venv/bin:/usr/bin" and env["PYTHONPATH"] == "/x"
    assert env["KVM_TESTBED_SEED"] == "1"
    assert env["PYTHONPYCACHEPREFIX"] == "/cache/pyc"
    assert "KVM_TESTBED_RUN_LANE" not in env  # no lane inside the lane
    assert "SECRET_TOKEN" not in env  # negative control: only what the tests need passes
    assert env["HOME"].startswith(str(tmp_path)) and env["HYPOTHESIS_STORAGE_DIRECTORY"].startswith(
        str(tmp_path))


def test_job_script_runs_the_command_with_its_status(lane_tool, tmp_path: Path) -> None:
    """The generated script, run by sh here, keeps arguments intact and returns the exit status."""
    env = {"HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "KVM_TESTBED_LANE": "xen"}
    for code in (0, 7):
        script = lane_tool.job_script(
            ["/bin/sh", "-c", f'echo "$KVM_TESTBED_LANE|$1|$PWD"; exit {code}', "sh", "a b'c"],
            tmp_path, env)
        proc = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=30)
        assert proc.returncode == code
        assert proc.stdout == f"xen|a b'c|{tmp_path}\n"


def test_default_command_tests_the_installed_package(lane_tool) -> None:
    argv = lane_tool.default_command("/venv/bin/python")
    assert argv[:4] == ["/venv/bin/python", "-P", "-m", "pytest"]
    assert ["-m", "xen_lane"] == argv[4:6] and "tests/xen" in argv
    assert "no:cacheprovider" in argv


def test_debian_mirror_from_sources(lane_tool) -> None:
    deb822 = ("Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n\n"
              "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n")
    assert lane_tool.debian_mirror([deb822]) == "http://mirror.example/debian"
    one_line = "deb [arch=amd64] https://ftp.example.org/debian bookworm main\n"
    assert lane_tool.debian_mirror([one_line]) == "https://ftp.example.org/debian"
    # Negative control: only non-Debian sources -> the default archive.
    other = "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n"
    assert lane_tool.debian_mirror([other]) == "http://deb.debian.org/debian"


def test_newest_kernel_package(lane_tool) -> None:
    names = ["linux-image-6.12.43+deb12-amd64", "linux-image-6.12.95+deb12-amd64-unsigned",
             "linux-image-6.12.9+deb12-amd64", "linux-image-6.12.95+deb12-cloud-amd64",
             "linux-image-6.12.95+deb12-amd64-dbg", "linux-image-6.1.0-28-amd64"]
    assert lane_tool.newest_kernel_package(names) == "linux-image-6.12.95+deb12-amd64-unsigned"
    assert lane_tool.newest_kernel_package(names + ["linux-image-6.12.95+deb12-amd64"]) == \
        "linux-image-6.12.95+deb12-amd64"
    assert lane_tool.newest_kernel_package(["linux-image-6.1.0-28-amd64"]) is None


def test_newc_archive_is_readable_by_cpio(lane_tool, tmp_path: Path) -> None:
    archive = lane_tool.newc_archive([("bin", 0o040755, b""), ("bin/x", 0o100755, b"abc"),
                                      ("dev/console", 0o020600, b"5:1")])
    assert len(archive) % 4 == 0 and archive.startswith(b"070701")
    cpio = subprocess.run(["cpio", "-itv"], input=archive, capture_output=True, timeout=30)
    if cpio.returncode == 127 or b"not found" in cpio.stderr:
        pytest.skip("cpio not installed")
    listing = cpio.stdout.decode()
    assert "bin/x" in listing and "dev/console" in listing and listing.startswith("d")
    assert "5,   1" in listing or "5, 1" in listing


def elf_header(program_header_types: list[int]) -> bytes:
    """A minimal ELF64 header with program headers of the given types (nothing else is read)."""
    head = bytearray(64)
    head[:5] = b"\x7fELF\x02"
    head[0x20:0x28] = (64).to_bytes(8, "little")  # e_phoff
    head[0x36:0x38] = (56).to_bytes(2, "little")  # e_phentsize
    head[0x38:0x3A] = len(program_header_types).to_bytes(2, "little")
    for p_type in program_header_types:
        head += p_type.to_bytes(4, "little") + bytes(52)
    return bytes(head)


def test_elf_is_static(lane_tool) -> None:
    assert lane_tool.elf_is_static(elf_header([1, 1, 4])) is True  # PT_LOAD, PT_LOAD, PT_NOTE
    # Negative controls: a PT_INTERP header, a real dynamically linked program, not an ELF at all.
    assert lane_tool.elf_is_static(elf_header([6, 3, 1])) is False
    assert lane_tool.elf_is_static(Path("/bin/sh").resolve().read_bytes()[:65536]) is False
    assert lane_tool.elf_is_static(b"#!/bin/sh\n") is False


def test_help_has_an_example(lane_tool, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        lane_tool.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "-- /bin/sh -c 'exit 7'" in out and "--kernel" in out


def test_arguments_after_double_dash_are_the_command(lane_tool) -> None:
    args = lane_tool.parse_args(["--timeout", "60", "--", "pytest", "--timeout", "5"])
    assert args.timeout == 60 and args.command == ["pytest", "--timeout", "5"]
    assert lane_tool.parse_args([]).command == []


def test_console_scanner_follows_the_markers(lane_tool) -> None:
    scanner = lane_tool.ConsoleScanner()
    transcript = [
        ("Booting from ROM..XENLANE-INIT uptime=3.52", ("INIT", False)),  # mid-line: still seen
        ("[    3.9] kvm_amd: Nested Virtualization enabled", (None, False)),  # kernel noise, not shown
        ("XENLANE-BEGIN uptime=6.09", ("BEGIN", False)),
        ("PASSED test_x", (None, True)),
        ("echo XENLANE-END status=0", (None, True)),  # the command's own text: not a marker
        ("XENLANE-END status=0 uptime=8.31", ("END", False)),
        ("[    8.4] reboot: Power down", (None, False)),
    ]
    for elapsed, (line, expected) in enumerate(transcript):
        assert scanner.feed(line, float(elapsed)) == expected, line
    assert scanner.times() == (0.0, 2.0, 5.0)


def test_console_scanner_without_markers(lane_tool) -> None:
    """Negative control: a boot that never reaches /init shows no output and no times."""
    scanner = lane_tool.ConsoleScanner()
    assert scanner.feed("[ 1.0] Kernel panic - not syncing: VFS", 1.0) == (None, False)
    assert scanner.times() == (None, None, None)


def test_tmp_binds_names_only_the_top_level_tmp_directories_the_job_needs(lane_tool):
    assert lane_tool.tmp_binds(["/tmp/ci/repo", "/tmp/ci/repo/.venv/bin/python",
                                "/tmp/ci/repo/results", "/work/x", "/tmp/other/y"]) == ["ci", "other"]
    # Control: nothing under /tmp, nothing bound; /tmp itself is not a directory to bind.
    assert lane_tool.tmp_binds(["/work/main", "/usr/bin/python3", "/tmp"]) == []
