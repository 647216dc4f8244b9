"""``source-agent``: the console script (and ``python -m source_agent``)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
