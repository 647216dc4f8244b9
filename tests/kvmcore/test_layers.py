"""kvmcore's import graph: acyclic, and each module imports only from its own layer or below.

Imports inside functions count (they are edges all the same); imports under
``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import kvmcore

PACKAGE = Path(kvmcore.__file__).parent
#: Bottom-up: bindings and schema helpers; System/Vm/Vcpu; memory and the guest; the
#: state, strategy, capture and restore; the probe; the analysis; the entry points.
LAYERS = [
    {"_kvm", "_build", "errors", "deadline", "_ioctl", "_schema", "_layout", "xen", "dirty",
     "vcpu_thread"},
    {"vcpu", "vm", "system"},
    {"memory", "snapshot", "guest", "intact", "live"},
    {"state", "strategy", "report_doc", "migrate"},
    {"caps"},
    {"analysis"},
    {"__init__", "__main__"},
]


def imports_of(source: str) -> set[str]:
    """The sibling modules ``source`` imports (relative imports), TYPE_CHECKING aside."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= ({node.module.split(".")[0]} if node.module
                      else {alias.name for alias in node.names})
    return found


def graph() -> dict[str, set[str]]:
    return {p.stem: imports_of(p.read_text()) for p in PACKAGE.glob("*.py")}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node, [])):
            return found
    return None


def layer_of(module: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if module in layer)


def test_every_module_has_a_layer():
    assert set(graph()) <= set().union(*LAYERS)


def test_the_import_graph_is_acyclic():
    assert find_cycle(graph()) is None
    # Negative control: the checker sees a cycle through a function-level import.
    assert imports_of("def f():\n    from .state import VmState\n") == {"state"}
    assert find_cycle({"state": {"guest"}, "guest": {"snapshot"}, "snapshot": {"state"}})


def test_imports_point_down_the_layers():
    upward = sorted(f"{mod} (layer {layer_of(mod)}) imports {dep} (layer {layer_of(dep)})"
                    for mod, deps in graph().items() for dep in deps
                    if dep in set().union(*LAYERS) and layer_of(dep) > layer_of(mod))
    assert upward == []
    # Negative control: the old System.capabilities() import of the probe is upward.
    assert layer_of("caps") > layer_of("system")
