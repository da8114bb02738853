"""docs/ADAPTERS.md says what is true: its code runs, its tables match the code.

The adapter of section 1 streams what the page says; the conftest and tests of
section 3 pass as written (run by pytest in a fresh directory, against the
installed example adapter "shout"); the entry point of section 2 is the
example's; the property table, its thresholds and the kit's table name what
``turngate.testing`` has.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from llm_adapters import AdapterRequest, ChatMessage, Finish, TextDelta, Usage
from tests.upstream_fakes import run_adapter
from turngate import testing
from turngate.testing import conformance

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "ADAPTERS.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC, flags=re.S)


@pytest.mark.anyio
async def test_the_adapter_of_section_1_streams_as_described() -> None:
    namespace: dict[str, object] = {}
    exec(compile(blocks("python")[0], "ADAPTERS.md", "exec"), namespace)
    adapter = namespace["ShoutAdapter"]({})  # type: ignore[operator]
    request = AdapterRequest("", [ChatMessage("user", [{"type": "text", "text": "a b"}])])
    run = await run_adapter(adapter, request)
    assert run.error is None
    assert run.events == [TextDelta("A "), TextDelta("B "), Usage("shout", 2, 2), Finish("stop")]


def test_the_entry_point_of_section_2_is_the_examples() -> None:
    doc = tomllib.loads(blocks("toml")[0])
    example = tomllib.loads((REPO / "examples/turngate-shout/pyproject.toml").read_text())
    group = "turngate.adapters"
    assert doc["project"]["entry-points"][group] == example["project"]["entry-points"][group]


def test_the_tests_of_section_3_pass_as_written(tmp_path: Path) -> None:
    python = blocks("python")
    conftest = next(b for b in python if b.startswith("# tests/conftest.py"))
    tests = next(b for b in python if b.startswith("# tests/test_shout.py"))
    (tmp_path / "conftest.py").write_text(conftest)
    (tmp_path / "test_doc_shout.py").write_text(tests)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error",
         str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout, result.stdout


def test_the_property_table_matches_the_checks() -> None:
    rows = re.findall(r"^\| `(\w+)` \| (.*) \|$", DOC.split("## 4.")[1], flags=re.M)
    assert [name for name, _ in rows] == list(conformance.PROPERTIES)
    text = dict(rows)
    assert f"at least once every {conformance.MAX_EVENTS_PER_STEP} events" in text["yields"]
    assert f"within {conformance.STOP_WITHIN * 1000:.0f} ms" in text["disconnect"]
    assert f"at least {conformance.MIN_CUTS} for long" in text["disconnect"]
    assert f"after {conformance.ERROR_AFTER} events" in text["errors"]
    sample = re.search(r"```\n(PASS events.*?)```", DOC, flags=re.S)
    assert sample is not None
    assert [line.split()[1] for line in sample.group(1).splitlines()] == list(
        conformance.PROPERTIES)


def test_the_kit_table_names_what_turngate_testing_exports() -> None:
    section = DOC.split("## 3.")[1].split("## 4.")[0]
    names = set()
    for cell in re.findall(r"^\| ([^|]+) \|", section, flags=re.M):
        names.update(re.findall(r"`(\w+)", cell))
    names.discard("name")
    assert names, "no names found in the kit's table"
    missing = names - set(testing.__all__)
    assert not missing, f"documented but not exported by turngate.testing: {missing}"


def test_the_kit_and_the_adapter_api_are_typed() -> None:
    for package in ("turngate", "llm_adapters"):
        assert (REPO / package / "py.typed").is_file(), package
    mypy = Path(sys.executable).parent / "mypy"
    example = REPO / "examples" / "turngate-shout"
    result = subprocess.run(
        [str(mypy), "--strict", "--ignore-missing-imports",
         str(example / "turngate_shout.py"), str(example / "tests")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
