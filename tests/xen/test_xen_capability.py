"""Inside the lane: the kernel really has KVM Xen with runstate, and netem works on loopback.

Outside the lane these are skipped (conftest.py) on a kernel without KVM_CAP_XEN_HVM.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest

from xen_lane_probe import in_lane, xen_hvm_bits

# include/uapi/linux/kvm.h, KVM_XEN_HVM_CONFIG_* (bit positions).
XEN_HVM_BITS = {
    0: "HYPERCALL_MSR",
    1: "INTERCEPT_HCALL",
    2: "SHARED_INFO",
    3: "RUNSTATE",
    4: "EVTCHN_2LEVEL",
    5: "EVTCHN_SEND",
    6: "RUNSTATE_UPDATE_FLAG",
    7: "PVCLOCK_TSC_UNSTABLE",
    8: "SHARED_INFO_HVA",
}
NEEDED = ("SHARED_INFO", "RUNSTATE")  # the runstate area lives in guest memory the shared info maps


def bit_names(bits: int) -> list[str]:
    names = [name for bit, name in XEN_HVM_BITS.items() if bits >> bit & 1]
    unknown = bits & ~((1 << len(XEN_HVM_BITS)) - 1)
    return names + ([f"unknown:{unknown:#x}"] if unknown else [])


def missing_xen_features(bits: int) -> list[str]:
    return [name for name in NEEDED if name not in bit_names(bits)]


def test_missing_features_negative_control() -> None:
    """The check below can fail: a value without RUNSTATE (or without anything) is reported."""
    assert missing_xen_features(0x1FF) == []
    assert missing_xen_features(0x1FF & ~(1 << 3)) == ["RUNSTATE"]
    assert missing_xen_features(0) == ["SHARED_INFO", "RUNSTATE"]
    assert bit_names(0x1FF | 1 << 12)[-1] == "unknown:0x1000"


@pytest.mark.xen_lane
def test_xen_hvm_capability() -> None:
    bits = xen_hvm_bits()
    # The lane's capability line (shown by pytest -rA in CI).
    print(f"KVM_CAP_XEN_HVM = {bits:#x} on {os.uname().release}: {' '.join(bit_names(bits)) or 'none'}")
    assert missing_xen_features(bits) == [], f"KVM_CAP_XEN_HVM = {bits:#x}"


def udp_rtt_ms() -> float:
    """One UDP round trip over loopback, in ms: each direction leaves through lo's root qdisc once."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        a.settimeout(5)
        b.settimeout(5)
        start = time.monotonic()
        a.sendto(b"ping", b.getsockname())
        data, peer = b.recvfrom(16)
        b.sendto(data, peer)
        a.recvfrom(16)
        return (time.monotonic() - start) * 1000


def tc(*args: str) -> str:
    proc = subprocess.run(["tc", *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"tc {' '.join(args)}: {proc.stderr.strip()}"
    return proc.stdout


@pytest.mark.xen_lane
def test_netem_delay_on_loopback() -> None:
    """netem really delays: 10 ms each way gives >= 20 ms round trips; without it (the negative
    control, before and after) a round trip stays well under 10 ms, even under TCG."""
    if not in_lane():
        pytest.skip("runs only inside the lane: it would delay this host's own loopback traffic")
    if shutil.which("tc") is None:
        pytest.skip("unsupported on this host: tc (install iproute2)")
    if os.geteuid() != 0:
        pytest.skip("unsupported on this host: CAP_NET_ADMIN (tc needs root)")
    before = min(udp_rtt_ms() for _ in range(5))
    tc("qdisc", "add", "dev", "lo", "root", "netem", "delay", "10ms")
    try:
        assert "netem" in tc("qdisc", "show", "dev", "lo")
        delayed = min(udp_rtt_ms() for _ in range(5))
    finally:
        tc("qdisc", "del", "dev", "lo", "root")
    after = min(udp_rtt_ms() for _ in range(5))
    print(f"loopback UDP RTT: {before:.2f} ms, with netem 10ms: {delayed:.2f} ms, after: {after:.2f} ms")
    assert "netem" not in tc("qdisc", "show", "dev", "lo")
    assert before < 10 and after < 10
    assert delayed >= 20
