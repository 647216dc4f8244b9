"""The real run_point: one migration through the agents (source_agent.migrate), as a report dict.

Kept apart from the runner so the runner never imports KVM: on a host or
branch without the agents, importing this module fails and the command says
so, while everything else (plans, summaries, plots, ktap) still works.

The host's capabilities are probed once per sweep — probing creates a VM,
which should not be repeated per point, and the capabilities cannot change
mid-sweep — and ``/dev/kvm`` is opened per point, so a point's failure can
leave nothing open for the next one.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import trio

import protocol
from kvmcore import HostCapabilities, Strategy, System, probe

from ..migrate import MigrationFailed, MigrationPlan, RolledBack, migrate
from ..report import compose
from .plan import PointConfig
from .runner import RunPoint, SweepStop, Target


def agent_run_point(*, warmup_ns: int = 10_000_000) -> RunPoint:
    caps: list[HostCapabilities] = []

    async def run_point(point: PointConfig, target: Target) -> dict[str, Any]:
        psk = protocol.load_psk(target.psk_file) if target.psk_file else b""
        with System() as kvm:
            if not caps:
                caps.append(await trio.to_thread.run_sync(probe, kvm))
            plan = MigrationPlan(host=target.host, port=target.port, psk=psk,
                                 strategy=Strategy.resolve(point.strategy, caps[0]),
                                 memory_size=point.memory_size, warmup_ns=warmup_ns,
                                 gap_ns=point.gap_ns, topology=target.topology, mode=point.mode,
                                 dirty_rate=point.dirty_rate, working_set=point.working_set)
            started = time.time_ns()
            try:
                migration = await migrate(plan, kvm, caps[0])
            except (protocol.AuthenticationFailed, protocol.VersionMismatch) as exc:
                # Every later point would fail the same way: stop, as migrate's exit 3 would.
                raise SweepStop(f"{target.destination}: {exc}") from None
            except MigrationFailed as exc:
                # The run failed with the source guest resumed (rolled back) or lost: recorded
                # with its statistics, as `source-agent migrate` records it.
                return {"command": "sweep", "outcome": "rolled back" if isinstance(
                            exc, RolledBack) else "error", "exit_code": 3,
                        "error": f"{type(exc.cause).__name__}: {exc}", "topology": target.topology,
                        "memory_size": point.memory_size, "strategy": str(plan.strategy),
                        "migration": exc.stats.to_plain(),
                        **({"rollback": exc.rollback.to_plain()}
                           if isinstance(exc, RolledBack) else {})}
        return compose(migration, run_id=f"sweep-{secrets.token_hex(4)}", started_ns=started,
                       command="sweep")

    return run_point
