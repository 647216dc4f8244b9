"""What both agents share, and nothing else: the version, exit codes and option grammar.

Neither agent imports the other: `dest_agent` and `source_agent` both build on this
package (and on kvmcore and protocol), so a change in one agent never reaches the
other by accident.
"""

from __future__ import annotations

from importlib import metadata

try:
    AGENT_VERSION = metadata.version("kvm-migration-testbed")
except metadata.PackageNotFoundError:   # running from a checkout that was never installed
    AGENT_VERSION = "0.0.0+unknown"

__all__ = ["AGENT_VERSION"]
