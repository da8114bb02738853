"""pyproject.toml tells the truth: what the code imports is what it declares.

The product packages import only their runtime dependencies; bench/ imports only
those and the ``bench`` extra; tests/ only those and the ``test`` extra. And a
runtime dependency is imported by the product (sse-starlette, used only by the
benchmark baseline and the encoding test, is in the extras).
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("gateway", "persistence", "llm_adapters", "turngate")
# A runtime dependency the product uses without importing it: the SQLite driver, whose
# connections `databases` opens and persistence/ drives through their own API.
NOT_IMPORTED = {"aiosqlite"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imports(folders: tuple[str, ...]) -> set[str]:
    """Top-level module names imported by the .py files under ``folders``."""
    found: set[str] = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            if any(part.startswith(".") for part in path.relative_to(ROOT).parts):
                continue  # bench/.litellm-venv and other environments the scripts make
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return found


def _distributions(modules: set[str]) -> set[str]:
    """The installed distributions that provide ``modules`` (the standard library and
    the project's own packages left out)."""
    owners = packages_distributions()
    local = {*PRODUCT, "tests", "bench", "common", "turngate_shout", "turngate_echo2"}
    out: set[str] = set()
    for module in modules - set(sys.stdlib_module_names) - local:
        names = owners.get(module)
        assert names, f"{module!r} is imported but no installed distribution provides it"
        out.update(name.lower().replace("_", "-") for name in names)
    return out


def test_the_product_imports_only_runtime_dependencies_and_uses_them_all() -> None:
    runtime = {_name(r) for r in _project()["dependencies"]}
    used = _distributions(_imports(PRODUCT)) - {"turngate"}
    assert used <= runtime, f"imported but not a runtime dependency: {used - runtime}"
    assert runtime - used <= NOT_IMPORTED, (
        f"runtime dependencies nothing imports: {runtime - used}"
    )
    assert "sse-starlette" not in runtime


def test_bench_and_tests_import_only_what_their_extras_add() -> None:
    project = _project()
    runtime = {_name(r) for r in project["dependencies"]}
    for extra, folder in (("bench", "bench"), ("test", "tests")):
        declared = runtime | {_name(r) for r in project["optional-dependencies"][extra]}
        used = _distributions(_imports((folder,))) - {"turngate"}
        assert used <= declared, f"{folder}/ imports what no dependency declares: {used - declared}"
    assert "sse-starlette" in {_name(r) for r in project["optional-dependencies"]["bench"]}
