"""The test suite's own shape: every helper in tests/support, imported by name, one home per fixture.

Why it matters: a helper beside its tests is importable only under pytest's default import mode
(which puts each test directory on sys.path), a ``from conftest import`` picks whichever conftest
was imported last, and a ``sys.path`` edit makes the tests import something else than the
installed package. Each rule is checked on the real tree and, as its negative control, on a small
tree that breaks it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
SUPPORT = TESTS / "support"
MUTATORS = {"insert", "append", "extend", "remove", "pop", "clear"}


def _is_sys_path(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "path"
            and isinstance(node.value, ast.Name) and node.value.id == "sys")


def offences(path: Path) -> list[str]:
    """``from conftest import`` / ``import conftest`` and every edit of ``sys.path`` in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and node.module == "conftest":
            found.append(f"{where}: from conftest import")
        elif isinstance(node, ast.Import) and any(a.name == "conftest" for a in node.names):
            found.append(f"{where}: import conftest")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in MUTATORS and _is_sys_path(node.func.value)):
            found.append(f"{where}: sys.path.{node.func.attr}")
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if _is_sys_path(target) or (isinstance(target, ast.Subscript)
                                            and _is_sys_path(target.value)):
                    found.append(f"{where}: sys.path assigned")
    return found


def misplaced(root: Path) -> list[str]:
    """Python files under ``root`` that are neither tests nor conftests nor in ``root/support``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                  if not p.is_relative_to(root / "support")
                  and not (p.name.startswith("test_") or p.name == "conftest.py"))


def fixtures(root: Path) -> Counter[str]:
    """How many times each fixture name is defined under ``root`` (``@pytest.fixture`` functions)."""
    names: Counter[str] = Counter()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                    "fixture" in ast.unparse(d) for d in node.decorator_list):
                names[node.name] += 1
    return names


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


def test_no_conftest_import_and_no_sys_path_edit():
    assert [o for p in sorted(TESTS.rglob("*.py")) for o in offences(p)] == []


def test_the_offence_check_can_fail(tmp_path):
    bad = write(tmp_path, {"test_bad.py": """
        import sys, conftest
        from conftest import open_fds
        sys.path.insert(0, "x")
        sys.path[:] = []
        sys.path += ["y"]
        print(sys.path, sys.argv.append)   # reading sys.path is fine
        """}) / "test_bad.py"
    assert sorted(o.split(": ", 1)[1] for o in offences(bad)) == [
        "from conftest import", "import conftest", "sys.path assigned", "sys.path assigned",
        "sys.path.insert"]


def test_every_helper_lives_in_support():
    assert misplaced(TESTS) == []


def test_the_placement_check_can_fail(tmp_path):
    root = write(tmp_path, {"area/test_a.py": "", "area/conftest.py": "", "area/area_helpers.py": "",
                            "support/fine.py": ""})
    assert misplaced(root) == ["area/area_helpers.py"]


def test_every_fixture_is_defined_once():
    assert [name for name, count in fixtures(TESTS).items() if count > 1] == []


def test_the_fixture_check_can_fail(tmp_path):
    fixture = "import pytest\n@pytest.fixture(scope='session')\ndef caps():\n    return 1\n"
    root = write(tmp_path, {"a/conftest.py": fixture, "b/conftest.py": fixture,
                            "b/test_b.py": "def test_b(caps):\n    assert caps\n"})
    assert fixtures(root) == Counter({"caps": 2})


def outcomes(*targets: str, cwd: Path = TESTS.parent) -> dict[str, str]:
    """``{test name: PASSED | SKIPPED ...}`` of a pytest run over ``targets`` (a subprocess)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                           *targets], cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("PASSED", "SKIPPED"))]
    assert lines, proc.stdout + proc.stderr
    return {line.split("::")[-1] if line.startswith("PASSED") else line.split(":")[0]: line
            for line in lines}


def test_xen_guest_tests_pass_or_skip_as_they_checked(caps):
    """A pass is a pass and a skip a skip: on this host one of the two runs, the other skips,
    naming why (before, one test checked the refusal and then reported a skip)."""
    got = outcomes("tests/kvmcore/test_bindings.py::test_xen_guest_needs_the_capability",
                   "tests/kvmcore/test_bindings.py::test_xen_guest_runs_with_the_capability")
    ran, skipped = (("runs_with", "needs") if caps.xen_runstate else ("needs", "runs_with"))
    passed = [line for line in got.values() if line.startswith("PASSED")]
    skips = [line for line in got.values() if line.startswith("SKIPPED")]
    assert len(passed) == 1 and f"test_xen_guest_{ran}_the_capability" in passed[0]
    assert len(skips) == 1 and "KVM_CAP_XEN_HVM" in skips[0]


def test_a_check_then_skip_reads_as_a_skip(tmp_path):
    """Negative control: the old shape (assert, then skip) is reported as a skip and no pass,
    so the check above would have failed on it."""
    write(tmp_path, {"test_old.py": """
        import pytest
        def test_old():
            assert 1 + 1 == 2
            pytest.skip("unsupported on this host: KVM_CAP_XEN_HVM (only the refusal was tested)")
        """})
    got = outcomes("test_old.py", cwd=tmp_path)
    assert [line.split()[0] for line in got.values()] == ["SKIPPED"]
