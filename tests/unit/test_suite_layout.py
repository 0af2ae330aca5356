"""The test suite is a suite, not a web: shared helpers live in conftest.py and the helper
modules (support.py, reference.py, ...), and no test module imports another test module.
(Importing one also imports its module-level fixtures, which then start their servers and
Envoys a second time in the importing module.)"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def _is_test_module(dotted: str) -> bool:
    return dotted.split(".")[-1].startswith("test_")


def test_imports_of_test_modules():
    """What the check below counts as importing a test module, on a few spellings."""
    source = ("import test_gateway\nfrom test_gateway import start_gateway\nfrom tests.unit import test_wire\n"
              "from unit.test_errors import x\nimport support\nfrom reference import check_result\n")
    assert [name for _, name in _test_module_imports(ast.parse(source))] == [
        "test_gateway", "test_gateway", "tests.unit.test_wire", "unit.test_errors"]


def _test_module_imports(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if _is_test_module(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if _is_test_module(node.module):
                found.append((node.lineno, node.module))
            else:  # from tests.unit import test_wire
                found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                          if _is_test_module(alias.name)]
    return found


def test_no_test_module_imports_another():
    offenders = [
        f"{path.relative_to(TESTS)}:{line} imports {name}"
        for path in sorted(TESTS.rglob("*.py"))
        for line, name in _test_module_imports(ast.parse(path.read_text(), str(path)))
    ]
    assert not offenders, "move what is shared into tests/support.py or conftest.py:\n" + "\n".join(offenders)


def test_no_two_test_modules_share_a_file_name():
    """tests/ and tests/unit/ are not packages: pytest imports each test module by its file name,
    so a second test_x.py stops the whole suite's collection ("import file mismatch"), though
    each directory alone collects. tests/unit alone is what runs before a landing."""
    by_name: dict[str, list[str]] = {}
    for path in sorted(TESTS.rglob("test_*.py")):
        by_name.setdefault(path.name, []).append(str(path.relative_to(TESTS)))
    assert not {name: paths for name, paths in by_name.items() if len(paths) > 1}
