"""Fuzz the frame decoder, the validators and the state machine; only protocol errors may come out.

    python bench/protocol_fuzz.py [--inputs 100000] [--seed 1]

Runs the five kinds of input of tests/support/fuzz_inputs.py (``KINDS``, listed below), in equal
shares; tests/robustness/test_fuzz.py runs the same kinds under hypothesis in CI (2 000 inputs
each), this script many more. Any exception that is not a `protocol.ProtocolError` (``FieldError``
for kind 4) is printed with the input's index and the run exits 1.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

# The generators are the tests' (CI runs them): tests/support is pytest's pythonpath, and here.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))

import fuzz_inputs  # noqa: E402
from fuzz_inputs import KINDS, record, run_one  # noqa: E402

import protocol  # noqa: E402
from protocol._frames import FieldError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=f"{__doc__}\n{fuzz_inputs.__doc__}", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    recorded = record()
    counts = {"ok": 0, "protocol error": 0}
    per_kind = [0] * len(KINDS)
    start = time.perf_counter()
    for i in range(args.inputs):
        kind = i % len(KINDS)
        per_kind[kind] += 1
        try:
            run_one(kind, rng, recorded)
            counts["ok"] += 1
        except (protocol.ProtocolError, FieldError):
            counts["protocol error"] += 1
        except Exception as exc:  # the point of the run: anything else is a bug
            print(f"input {i} (kind {kind}, --seed {args.seed}) raised {type(exc).__name__}: {exc}")
            return 1
    elapsed = time.perf_counter() - start
    print(f"{args.inputs} inputs in {elapsed:.1f} s: {counts['protocol error']} refused with a ProtocolError "
          f"(FieldError from the validators), {counts['ok']} accepted, nothing else raised")
    print("per kind: " + ", ".join(f"{name} {n}" for name, n in zip(KINDS, per_kind)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
