"""The rules of docs/ARCHITECTURE.md, checked on the source (every import counts,
also those inside functions and under ``TYPE_CHECKING``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _modules(package: str, root: Path = ROOT) -> list[Path]:
    return sorted((root / package).rglob("*.py"))


def _imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every module ``path`` imports (absolute names; relative ones resolved)."""
    names: set[str] = set()
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _offenders(
    packages: list[str], forbidden: tuple[str, ...], root: Path = ROOT
) -> list[str]:
    found = []
    for package in packages:
        for path in _modules(package, root):
            for name in sorted(_imports(path, root)):
                if any(name == f or name.startswith(f + ".") for f in forbidden):
                    found.append(f"{path.relative_to(root)} imports {name}")
    return found


def test_nothing_below_the_routes_imports_them() -> None:
    below = ["gateway/turn", "gateway/streaming", "persistence", "llm_adapters"]
    assert _offenders(below, ("gateway.api", "gateway.app")) == []


def test_streaming_does_not_import_the_turn() -> None:
    assert _offenders(["gateway/streaming"], ("gateway.turn",)) == []


def test_persistence_and_adapters_import_nothing_from_the_gateway() -> None:
    assert _offenders(["persistence", "llm_adapters"], ("gateway",)) == []


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    (tmp_path / "gateway" / "turn").mkdir(parents=True)
    (tmp_path / "gateway" / "turn" / "probe.py").write_text(
        "def f() -> None:\n    from ..api import errors\n"
    )
    (tmp_path / "gateway" / "turn" / "fine.py").write_text("from gateway.streaming import sse\n")
    assert _offenders(["gateway/turn"], ("gateway.api",), tmp_path) == [
        "gateway/turn/probe.py imports gateway.api",
        "gateway/turn/probe.py imports gateway.api.errors",
    ]


# A module-level container that starts empty is filled at run time: a registry or a
# cache. Per-app state hangs off the app's context instead.
_MUTABLE = {"dict", "list", "set", "defaultdict", "OrderedDict", "deque", "Counter",
            "WeakKeyDictionary", "WeakValueDictionary", "WeakSet"}

# Removed by the other branches of the same restructuring; empty this set once merged.


def _registries(source: str) -> list[str]:
    found = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        empty = isinstance(value, ast.Dict) and not value.keys or (
            isinstance(value, ast.List | ast.Set) and not value.elts
        )
        func = value.func if isinstance(value, ast.Call) else None
        called = getattr(func, "id", None) or getattr(func, "attr", None)
        if empty or called in _MUTABLE:
            found.extend(ast.unparse(t) for t in targets)
    return found


def test_no_module_level_registries() -> None:
    found = {
        f"{path.relative_to(ROOT)}: {name}"
        for package in ("gateway", "persistence", "llm_adapters")
        for path in _modules(package)
        for name in _registries(path.read_text(encoding="utf-8"))
    }
    assert found == set()


@pytest.mark.parametrize("source", [
    "_BY_APP: WeakKeyDictionary[object, int] = WeakKeyDictionary()",
    "import weakref\n_BY_APP = weakref.WeakKeyDictionary()",
    "_SEEN = {}",
    "_SEEN: dict[str, int] = dict()",
])
def test_the_registry_check_sees_one(source: str) -> None:
    assert len(_registries(source)) == 1


def test_constant_tables_are_not_registries() -> None:
    assert _registries('_REASON = {"complete": "stop"}\nHEADERS = [("a", "b")]') == []
