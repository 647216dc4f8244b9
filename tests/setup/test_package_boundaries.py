"""Who may import whom across the top-level packages (one home per concept, no accidents).

kvmcore and protocol are leaves; agentcore is what both agents share; the agents do not
import each other, except `source-agent loopback`, which by its nature starts a destination
in-process; source_agent.netem stands alone (agentcore at most).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("agentcore", "kvmcore", "protocol", "dest_agent", "source_agent")
#: package -> the other top-level packages it may import.
ALLOWED = {
    "kvmcore": set(),
    "protocol": set(),
    "agentcore": {"kvmcore"},
    "dest_agent": {"agentcore", "kvmcore", "protocol"},
    "source_agent": {"agentcore", "kvmcore", "protocol"},
    "source_agent.netem": {"agentcore"},
}
#: The one deliberate crossing, and why: loopback runs both agents in one process.
EXCEPTIONS = {("source_agent/loopback.py", "dest_agent")}


def top_level_imports(source: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


def area(path: Path) -> str:
    rel = path.relative_to(REPO).parts
    return "source_agent.netem" if rel[:2] == ("source_agent", "netem") else rel[0]


def crossings() -> list[str]:
    bad = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = str(path.relative_to(REPO))
            for dep in top_level_imports(path.read_text()) - {package}:
                if dep not in ALLOWED[area(path)] and (rel, dep) not in EXCEPTIONS:
                    bad.append(f"{rel} imports {dep}")
    return bad


def test_packages_import_only_what_they_may():
    assert crossings() == []


def test_the_checker_sees_a_crossing():
    # Negative control: what dest_agent/cli.py once did.
    assert top_level_imports("from source_agent.options import parse_size\n") == {"source_agent"}
    assert "source_agent" not in ALLOWED["dest_agent"]
    assert top_level_imports("import kvmcore.xen\nfrom . import x\n") == {"kvmcore"}
