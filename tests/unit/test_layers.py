"""The layers of `service/` import only downwards (service/__init__.py says which way), and
the engine's hand-off types stay torch-free. Read from the source with ast: nothing is run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVICE = REPO / "service"

# What each part of the package may import from the rest of it.
BASE = ("service.errors", "service.metrics", "service.request_context", "service.tracing", "service.logs",
        "service.platforms", "service.cgroup_limits")
ALLOWED = {
    "service.api": {"service.api", "service.engine", "service.models", *BASE},
    "service.engine": {"service.engine", "service.models", *BASE},
    "service.models": {"service.models", *BASE},
    # The settings' declaration: it reads the defaults of the parts below it, never the server.
    "service.config": {"service.config", "service.api", "service.engine", "service.errors", "service.metrics"},
    "service.errors": set(),
    "service.metrics": set(),
    "service.request_context": set(),
    "service.tracing": {"service.metrics"},  # it counts the trace headers it ignores
    "service.logs": {"service.request_context"},
    # The device seam: the only caller of torch.cuda (docs/gpus.md).
    "service.platforms": {"service.platforms"},
    "service.cgroup_limits": set(),
}
# Modules of the engine that never touch a tensor: they must not pull torch in.
TORCH_FREE = ["service.engine.inputs", "service.engine.policy", "service.engine.intake",
              "service.engine.dispatch", "service.engine.interleaving", "service.engine.scheduler", "service.engine.router",
              "service.engine.result_cache", "service.api.validation", "service.api.json_body",
              "service.api.request_schema", "service.api.json_limits", "service.errors", "service.metrics",
              "service.config", "service.request_context", "service.tracing", "service.logs",
              "service.cgroup_limits"]  # the gateway reads the settings' declaration too


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports at run time (imports under `if TYPE_CHECKING:` left out)."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for node in ast.walk(tree) if isinstance(node, ast.If)
               and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
               for node in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


MODULES = {_module_name(p): p for p in sorted(SERVICE.rglob("*.py"))}


def _part(module: str) -> str | None:
    return next((part for part in ALLOWED if module == part or module.startswith(part + ".")), None)


def _package_modules(imported: set[str]) -> set[str]:
    """The imported names that are modules of the package (from-imports of functions dropped)."""
    return {name for name in imported if name in MODULES or any(m.startswith(name + ".") for m in MODULES)}


@pytest.mark.parametrize("module", [m for m in MODULES if _part(m)])
def test_imports_run_only_downwards(module):
    allowed = ALLOWED[_part(module)]
    targets = _package_modules(_imports(MODULES[module])) - {"service"}
    upward = sorted(t for t in targets if not any(t == a or t.startswith(a + ".") for a in allowed))
    assert not upward, f"{module} imports {upward}; it may import only {sorted(allowed)}"


def test_nothing_in_the_package_imports_the_composition_root():
    for module, path in MODULES.items():
        if module in ("service.server", "service.model_specs"):
            continue
        assert not {"service.server", "service.model_specs"} & _imports(path), module


def _closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current in seen or current not in MODULES:
            continue
        seen.add(current)
        todo += [m for m in _package_modules(_imports(MODULES[current])) if m in MODULES]
    return seen


@pytest.mark.parametrize("module", TORCH_FREE)
def test_hand_off_types_and_policy_do_not_import_torch(module):
    heavy = {m: sorted(n for n in _imports(MODULES[m]) if n.split(".")[0] in ("torch", "esm"))
             for m in _closure(module)}
    assert not {m: v for m, v in heavy.items() if v}, f"{module} pulls in torch through {heavy}"
