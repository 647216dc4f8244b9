"""The capability probe: a stable document, and no VM left behind."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from common_helpers import open_fds

from kvmcore import HostCapabilities, StateError, Strategy, System, probe

KEYS = {
    "kernel_release", "kvm_modules", "api_version", "clocksource", "tsc_khz", "master_clock",
    "get_clock_flags", "adjust_clock_flags", "xen_hvm", "clock_guest", "clock_guest_detail",
    "tsc_offset_attr", "tsc_offset_applies", "tsc_offset_detail", "tsc_scale_attr",
    "tsc_control", "tsc_adjust_msr", "kvmclock", "kvmclock_stable_bit", "steal_time",
    "dirty_log", "dirty_log_manual_protect", "dirty_log_ring",
}


def test_probe_json_has_every_key():
    out = subprocess.run([sys.executable, "-P", "-m", "kvmcore", "probe", "--json"], check=True,
                         capture_output=True, text=True).stdout
    doc = json.loads(out)
    assert set(doc) == KEYS | {"default_strategy"}
    assert doc["api_version"] == 12
    assert doc["tsc_khz"] > 0
    strategy = doc.pop("default_strategy")
    caps = HostCapabilities.from_plain(doc)
    assert caps.to_plain() == doc
    assert strategy == str(Strategy.best(caps))


def test_probe_table_is_readable():
    out = subprocess.run([sys.executable, "-P", "-m", "kvmcore", "probe"], check=True,
                         capture_output=True, text=True).stdout
    assert all(any(line.startswith(key) for line in out.splitlines())
               for key in KEYS | {"default_strategy"})


def test_probe_findings_are_consistent(caps):
    # A vCPU ran with kvmclock enabled: KVM_GET_CLOCK has a realtime and a host TSC.
    assert caps.kvmclock
    if caps.master_clock:
        assert "TSC_STABLE" in caps.get_clock_flags
        assert caps.clock_guest is not None     # decidable with the master clock on
    if not caps.tsc_offset_attr:
        assert not caps.tsc_offset_applies


def test_probe_leaves_no_vm_behind():
    with System() as kvm:
        probe(kvm)                               # warm-up
        before = open_fds()
        probe(kvm)
        assert open_fds() == before


def test_from_plain_rejects_missing_and_extra_keys(caps):
    plain = caps.to_plain()
    with pytest.raises(StateError, match="missing"):
        HostCapabilities.from_plain({k: v for k, v in plain.items() if k != "tsc_khz"})
    with pytest.raises(StateError, match="unexpected"):
        HostCapabilities.from_plain({**plain, "bogus": 1})
    assert dataclasses.asdict(HostCapabilities.from_plain(plain)) == plain
