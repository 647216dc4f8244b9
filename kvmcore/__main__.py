"""``kvm-probe [--json]`` (also ``python -m kvmcore probe``): what this host's KVM can do.

Exit codes, the same as the agents': 0 probed, 2 no usable /dev/kvm (a one-line
reason, no traceback), 4 an unexpected failure of the probe itself (a bug).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from .caps import HostCapabilities, probe, render_table
from .errors import KvmError
from .migrate import Strategy
from .system import System

EXIT_OK, EXIT_USAGE, EXIT_INTERNAL = 0, 2, 4

DESCRIPTION = """\
Probe /dev/kvm for what a migration needs: API version, clocksource, KVM_GET_CLOCK
flags, TSC offset (checked inside a throwaway guest, not trusted from the
attribute), KVM_GET_CLOCK_GUEST, Xen runstate; and the restore strategy those
imply, which is what the agents use by default."""


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print the capability document as JSON (stable keys; the same "
                             "document the agents exchange), plus 'default_strategy'")
    parser.add_argument("--device", default="/dev/kvm", metavar="PATH",
                        help="the KVM device (default /dev/kvm)")


def _probe(device: str) -> HostCapabilities:
    with System(device) as kvm:
        return probe(kvm)


def run(args: argparse.Namespace) -> int:
    try:
        caps = _probe(args.device)
    except OSError as exc:
        print(f"kvm-probe: cannot open {args.device}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except KvmError as exc:
        print(f"kvm-probe: {args.device} is not usable: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a bug in the probe: say so in one line, keep the traceback
        print(f"kvm-probe: internal error: {type(exc).__name__}: {exc} (traceback follows)",
              file=sys.stderr)
        traceback.print_exc()
        return EXIT_INTERNAL
    strategy = str(Strategy.best(caps))
    if args.json:
        json.dump({**caps.to_plain(), "default_strategy": strategy}, sys.stdout,
                  indent=2, sort_keys=True)
        print()
    else:
        print(render_table(caps))
        print(f"{'default_strategy':<20} {strategy}")
    return EXIT_OK


def probe_main(argv: list[str] | None = None) -> int:
    """The ``kvm-probe`` console script."""
    parser = argparse.ArgumentParser(prog="kvm-probe", description=DESCRIPTION)
    _add_options(parser)
    return run(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """``python -m kvmcore probe``: the same command under its module name."""
    parser = argparse.ArgumentParser(prog="python -m kvmcore", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_options(sub.add_parser("probe", help="probe /dev/kvm (runs a throwaway guest)",
                                description=DESCRIPTION))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
