"""The source agent: drives migrations to a destination agent and reports what the guest saw.

``source-agent migrate`` / ``loopback`` / ``results``; `migrate.migrate` is the
coroutine a command or a sweep calls per migration. See docs/agents.md.
"""

from __future__ import annotations

from agentcore import AGENT_VERSION

__all__ = ["AGENT_VERSION"]
