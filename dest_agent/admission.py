"""Who may hold a connection to the destination, counted so strangers cannot starve key holders.

Why a module of its own: the rule is the server's defence against a denial of
service (issue 10, item 7), and it is easier to check in one place than spread
over the accept loop and the session.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .session import Counters, SessionRefused

if TYPE_CHECKING:
    from .server import ServerConfig


class Admission:
    """Who holds a connection slot. Strangers (not yet proved the key) and key holders are
    counted apart: strangers have their own cap, a cap per address and the handshake
    timeout; only key holders count against ``max_sessions``. So a stranger holding
    connections open delays nobody who has the key (issue 10, item 7)."""

    def __init__(self, config: ServerConfig, counters: Counters) -> None:
        self.config = config
        self.counters = counters
        self.sessions = 0
        self.strangers: dict[str, int] = {}

    def enter(self, address: str) -> Ticket | str:
        """A stranger's slot for ``address``, or the refusal naming the cap that is full."""
        config = self.config
        if self.counters.live_unauthenticated >= config.max_unauthenticated:
            return (f"the destination already has {config.max_unauthenticated} connections that "
                    "have not authenticated (--max-unauthenticated); retry later")
        if self.strangers.get(address, 0) >= config.max_unauthenticated_per_address:
            return (f"the destination already has {config.max_unauthenticated_per_address} "
                    f"connections from {address} that have not authenticated "
                    "(--max-unauthenticated-per-address); retry later")
        self.strangers[address] = self.strangers.get(address, 0) + 1
        self.counters.add("live_unauthenticated")
        return Ticket(self, address)


class Ticket:
    """One connection's slot: a stranger's, then (admit) a session's, until release."""

    def __init__(self, admission: Admission, address: str) -> None:
        self.admission = admission
        self.address = address
        self.holds = "stranger"

    def admit(self) -> None:
        """The peer proved the key: trade the stranger's slot for a session's, or raise
        SessionRefused("busy") when ``max_sessions`` key holders are served already."""
        admission = self.admission
        self.release()
        if admission.sessions >= admission.config.max_sessions:
            admission.counters.add("refused_busy")
            raise SessionRefused("busy", f"the destination already serves "
                                 f"{admission.config.max_sessions} sessions (--max-sessions); "
                                 "retry later")
        admission.sessions += 1
        self.holds = "session"

    def release(self) -> None:
        admission = self.admission
        if self.holds == "stranger":
            admission.counters.add("live_unauthenticated", -1)
            admission.strangers[self.address] -= 1
            if not admission.strangers[self.address]:
                del admission.strangers[self.address]
        elif self.holds == "session":
            admission.sessions -= 1
        self.holds = "nothing"
