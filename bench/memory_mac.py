"""The memory MAC's candidates on this host: throughput over 2 MiB and 256 MiB, inline and in threads.

    python bench/memory_mac.py [--sizes-mib 2 256] [--runs 5]

Figures, no pass/fail.  Each candidate is fed the memory the way the memory
stream feeds it: in 1 MiB pieces (one update per MEMORY chunk).  Rows:

* ``inline``: one thread, the event loop's;
* ``2 threads at once``: two threads each MAC the memory; their aggregate
  rate nears twice the inline one (on two idle cores) only if the MAC
  releases the GIL, which decides whether a worker thread can overlap it
  with the event loop's I/O;
* BLAKE3 also with its own threads (``max_threads``), which only pays off on
  idle cores.

Keyed: SHA-256 as HMAC (today's digest is unkeyed SHA-256, the same speed),
BLAKE3 in keyed mode, Poly1305 (one-time key, `cryptography`).  A candidate
whose package is missing is shown as such.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import threading
import time
from collections.abc import Callable
from typing import Any

PIECE = 1 << 20
KEY = bytes(range(32))


def candidates() -> dict[str, Callable[[], Any] | str]:
    found: dict[str, Callable[[], Any] | str] = {
        "HMAC-SHA256 (SHA-NI)": lambda: hmac.new(KEY, digestmod="sha256"),
        "SHA-256 unkeyed (today's digest)": hashlib.sha256,
    }
    try:
        import blake3

        found["BLAKE3 keyed, 1 thread"] = lambda: blake3.blake3(key=KEY)
        found["BLAKE3 keyed, max_threads=auto"] = lambda: blake3.blake3(key=KEY, max_threads=blake3.blake3.AUTO)
    except ImportError:
        found["BLAKE3 keyed"] = "not installed (pip install blake3)"
    try:
        from cryptography.hazmat.primitives.poly1305 import Poly1305

        found["Poly1305 (cryptography)"] = lambda: Poly1305(KEY)
    except ImportError:
        found["Poly1305"] = "not installed (pip install cryptography)"
    return found


def feed(make: Callable[[], Any], memory: memoryview) -> None:
    mac = make()
    for offset in range(0, len(memory), PIECE):
        mac.update(memory[offset : offset + PIECE])
    (mac.finalize if hasattr(mac, "finalize") else mac.digest)()


def inline(make: Callable[[], Any], memory: memoryview, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        feed(make, memory)
        best = min(best, time.perf_counter() - start)
    return len(memory) / best / 1e9


def two_threads(make: Callable[[], Any], memory: memoryview, runs: int) -> float:
    """Aggregate GB/s of two threads each MACing the whole memory at once (best run).

    Near twice the inline figure on two idle cores if the MAC releases the
    GIL; the inline figure or less if it holds it (the threads take turns).
    """
    best = float("inf")
    for _ in range(runs):
        workers = [threading.Thread(target=feed, args=(make, memory)) for _ in range(2)]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = min(best, time.perf_counter() - start)
    return 2 * len(memory) / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[2, 256])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"load average {open('/proc/loadavg').read().split()[0]} ({os.cpu_count()} CPUs, shared)")
    print(f"{'size':>8}  {'candidate':34} {'inline':>10} {'2 threads at once':>18}")
    for mib in args.sizes_mib:
        memory = memoryview(os.urandom(mib << 20))
        runs = args.runs if mib <= 16 else max(1, args.runs // 2)
        for name, make in candidates().items():
            if isinstance(make, str):
                print(f"{mib:>5} MiB  {name:34} {make}")
                continue
            rate = inline(make, memory, runs)
            both = two_threads(make, memory, runs)
            print(f"{mib:>5} MiB  {name:34} {rate:>6.2f} GB/s {both:>13.2f} GB/s")

if __name__ == "__main__":
    main()
