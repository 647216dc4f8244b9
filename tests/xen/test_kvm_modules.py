"""tools/kvm_modules.py's pure parts (the clock-guest module build for the lane), each with a negative
control. Fast, every host; the build itself runs with `./dev lane --clock-guest`."""
from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kvm_modules() -> ModuleType:
    """tools/kvm_modules.py, imported as xen_lane.py imports it (tools/ is on pytest's
    pythonpath)."""
    return importlib.import_module("kvm_modules")


def test_packages_are_the_kernels_own(kvm_modules: ModuleType) -> None:
    assert kvm_modules.packages("6.12.95+deb12-amd64") == [
        "linux-source-6.12", "linux-headers-6.12.95+deb12-amd64",
        "linux-headers-6.12.95+deb12-common", "linux-kbuild-6.12.95+deb12"]
    assert kvm_modules.packages("6.12.96+deb12-amd64")[1] != "linux-headers-6.12.95+deb12-amd64"


def test_cache_key_follows_version_release_and_patch(kvm_modules: ModuleType) -> None:
    key = kvm_modules.cache_key("6.12.95-1~bpo12+1", "6.12.95+deb12-amd64", b"patch")
    assert re.fullmatch(r"[0-9a-f]{16}", key)
    assert key == kvm_modules.cache_key("6.12.95-1~bpo12+1", "6.12.95+deb12-amd64", b"patch")
    for other in (("6.12.95-2~bpo12+1", "6.12.95+deb12-amd64", b"patch"),
                  ("6.12.95-1~bpo12+1", "6.12.96+deb12-amd64", b"patch"),
                  ("6.12.95-1~bpo12+1", "6.12.95+deb12-amd64", b"patch2")):
        assert kvm_modules.cache_key(*other) != key, other


def test_config_mismatch_ignores_only_build_time_symbols(kvm_modules: ModuleType,
                                                         lane_tool: ModuleType) -> None:
    image = "CONFIG_KVM=m\nCONFIG_KVM_XEN=y\n# CONFIG_X is not set\n"
    headers = image + 'CONFIG_BUILD_SALT="6.12.95+deb12-amd64"\nCONFIG_MODULE_SIG_ALL=y\n'
    assert kvm_modules.config_mismatch(headers, image, lane_tool.parse_kernel_config) == []
    # Negative control: a real difference is named.
    other = headers.replace("CONFIG_KVM_XEN=y", "CONFIG_KVM_XEN=n") + "CONFIG_X=y\n"
    assert kvm_modules.config_mismatch(other, image, lane_tool.parse_kernel_config) == [
        "CONFIG_KVM_XEN", "CONFIG_X"]


def test_patch_is_the_projects_and_names_itself(kvm_modules: ModuleType) -> None:
    text = kvm_modules.PATCH.read_text()
    header = text.split("\n--- ", 1)[0]
    assert "reference implementation" in header and "not taken from the series" in header
    assert text.count("\n+++ ") == 1 and "+++ b/arch/x86/kvm/x86.c" in text
    for number in ("_IOR(KVMIO, 0xd7, struct pvclock_vcpu_time_info)",
                   "_IOW(KVMIO, 0xd6, struct pvclock_vcpu_time_info)"):
        assert number in text
    assert "0xd5" not in text  # the 2024 numbers: 0xd5 is KVM_PRE_FAULT_MEMORY upstream


def test_build_failure_names_the_step_and_keeps_the_log(kvm_modules: ModuleType,
                                                        lane_tool: ModuleType,
                                                        tmp_path: Path) -> None:
    build = kvm_modules.Build(tmp_path / "build.log", lane_tool)
    build.step("patch", ["sh", "-c", "echo applied"], 30)  # control: success raises nothing
    with pytest.raises(lane_tool.LaneError) as e:
        build.step("build", ["sh", "-c", "echo 'x86.c:1: error: boom' >&2; exit 2"], 30)
    assert "at step 'build'" in str(e.value) and str(build.log) in str(e.value)
    log = build.log.read_text()
    assert "== step patch" in log and "applied" in log and "error: boom" in log


def test_lane_flag(lane_tool: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert lane_tool.parse_args(["--clock-guest"]).clock_guest is True
    assert lane_tool.parse_args([]).clock_guest is False  # control: Debian's own modules
    with pytest.raises(SystemExit):  # the modules are built for the Debian kernel only
        lane_tool.parse_args(["--clock-guest", "--kernel", "bzImage"])
    assert "not with --kernel" in capsys.readouterr().err


def test_missing_tools_names_the_packages(kvm_modules: ModuleType) -> None:
    assert kvm_modules.missing_tools(lambda program: f"/usr/bin/{program}") == []  # control
    absent = {"pahole", "x86_64-linux-gnu-gcc-12"}
    found = kvm_modules.missing_tools(lambda p: None if p in absent else f"/usr/bin/{p}")
    assert found == ["dwarves", "gcc-12"]


def test_cached_modules_are_checked_against_their_manifest(kvm_modules: ModuleType,
                                                           lane_tool: ModuleType,
                                                           tmp_path: Path) -> None:
    (tmp_path / "kvm.ko").write_bytes(b"module")
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"files": {"kvm.ko": lane_tool.sha256_file(tmp_path / "kvm.ko")}}))
    assert kvm_modules.cached(tmp_path, lane_tool)
    (tmp_path / "kvm.ko").write_bytes(b"modulf")  # negative control: a changed file rebuilds
    assert not kvm_modules.cached(tmp_path, lane_tool)
    assert not kvm_modules.cached(tmp_path / "absent", lane_tool)
