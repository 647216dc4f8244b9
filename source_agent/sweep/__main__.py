"""``python -m source_agent.sweep NAME ...``: the sweep command before it is wired into source-agent."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
