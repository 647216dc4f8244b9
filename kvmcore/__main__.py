"""``python -m kvmcore probe [--json]``: what this host's KVM can do for a migration."""

from __future__ import annotations

import argparse
import json
import sys

from .caps import probe, render_table
from .system import System


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmcore")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="probe /dev/kvm (runs a throwaway guest)")
    p.add_argument("--json", action="store_true", help="print the stable JSON document")
    args = parser.parse_args(argv)

    with System() as kvm:
        caps = probe(kvm)
    if args.json:
        json.dump(caps.to_plain(), sys.stdout, indent=2, sort_keys=True)
        print()
    else:
        print(render_table(caps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
