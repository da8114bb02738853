"""``turngate check-adapter``: the built-in adapters pass it, three broken ones fail it.

The built-ins: ``scripted`` (text, reasoning and tool calls), and ``openai`` and
``anthropic`` against the fake upstream replaying recorded provider streams
(started here, in the test's loop, while ``check-adapter`` runs in its own
process with ``OPENAI_BASE_URL`` / ``ANTHROPIC_BASE_URL`` pointing at it). The
broken adapters (tests/broken_adapters.py) each fail exactly their property,
and the line names it with the measured figure.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
import pytest

from tests.broken_adapters import Hangs, NeverAwaits, NoUsage, SwallowsCancel
from tests.upstream_fakes import FakeResponse, FakeUpstream, fixture
from turngate.testing.conformance import (
    MAX_EVENTS_PER_STEP,
    PROPERTIES,
    AdapterReport,
    StreamRun,
    _cut_points,
    check_adapter,
)

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]
TURNGATE = os.path.join(os.path.dirname(sys.executable), "turngate")


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``turngate`` in its own process (cwd: a fresh directory); exit code and output."""
    environ = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    environ.pop("DATABASE_URL", None)
    result = await anyio.run_process([TURNGATE, *args], env=environ, check=False)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def property_lines(stdout: str) -> dict[str, str]:
    """``{property: line}`` from check-adapter's output, which is one line per property."""
    lines = stdout.strip().splitlines()
    names = [line.split()[1] for line in lines]
    assert names == list(PROPERTIES), f"property lines {names}; expected {list(PROPERTIES)}"
    return dict(zip(names, lines, strict=True))


def assert_all_pass(report: AdapterReport) -> None:
    assert report.ok, "\n".join(report.lines())
    assert [r.name for r in report.results] == list(PROPERTIES)


async def test_scripted_passes_with_text_reasoning_and_tools() -> None:
    report = await check_adapter("scripted:tokens=60,reasoning=4,tools=2,delay_ms=1")
    assert_all_pass(report)
    events = report.result("events").figure
    assert "text 60, reasoning 4, tool calls 2, usage 1, finish 1" in events, events
    assert "estimated=False" in report.result("usage").figure
    assert "cancelled mid-reply" in report.result("disconnect").figure


async def test_the_environments_database_and_redis_stay_out(pg_url: str) -> None:
    deployment = {"DATABASE_URL": "postgresql://nowhere.invalid/prod",
                  "REDIS_URL": "redis://127.0.0.1:1/0"}
    assert_all_pass(await check_adapter("scripted:tokens=30", env=deployment))
    # A database given explicitly is used (and migrated first, here a no-op).
    assert_all_pass(await check_adapter("scripted:tokens=30", env=deployment,
                                        database_url=pg_url))


async def test_cli_passes_scripted_and_prints_one_line_per_property(tmp_path: Path) -> None:
    code, out, err = await cli("check-adapter", "scripted:tokens=40,delay_ms=1")
    assert code == 0, out + err
    lines = property_lines(out)
    assert all(line.startswith("PASS ") for line in lines.values()), out
    assert "ms at worst" in lines["disconnect"]  # the measured figure is printed
    assert "all 6 properties hold" in err


async def test_cli_passes_openai_and_anthropic_against_the_fake_upstream() -> None:
    for model, name, env_name, base in [
        ("openai:gpt-4o", "openai-text-usage.sse", "OPENAI", "/v1"),
        ("anthropic:claude-sonnet-4-5", "anthropic-text-usage.sse", "ANTHROPIC", ""),
    ]:
        async with FakeUpstream() as fake:
            fake.default = FakeResponse.sse(fixture(name), delay=0.005)
            env = {f"{env_name}_BASE_URL": fake.url + base, f"{env_name}_API_KEY": "sk-check"}
            code, out, err = await cli("check-adapter", model, env=env)
            assert code == 0, f"{model}:\n{out}{err}"
            property_lines(out)
            # Every turn of the check reached the fake: full run, error run, every cut.
            assert len(fake.requests) >= 3, len(fake.requests)
            # The disconnects closed the upstream requests they cut short.
            cut_short = [r for r in fake.requests if not r.completed]
            for request in cut_short:
                await request.wait_disconnected(within=2.0)


@pytest.mark.parametrize(
    ("factory", "broken", "says"),
    [
        (NeverAwaits, "yields", "0 other requests answered while it produced them; "
                                f"expected at most {MAX_EVENTS_PER_STEP}"),
        (NoUsage, "usage", "no final Usage event: the row's usage was estimated"),
        (SwallowsCancel, "disconnect", "swallowed the cancellation"),
    ],
    ids=["never-awaits", "no-usage", "swallows-cancel"],
)
async def test_broken_adapters_fail_naming_the_property(
    factory: type, broken: str, says: str
) -> None:
    adapter = factory()
    report = await check_adapter(f"{factory.name}:v1", factory=lambda env: adapter)
    assert report.failed == [broken], "\n".join(report.lines())
    line = report.result(broken).line()
    assert line.startswith(f"FAIL {broken}") and says in line, line
    if isinstance(adapter, SwallowsCancel):
        # It really kept calling its upstream after the browser had left.
        assert adapter.calls_after_cancel > 0


async def test_an_adapter_that_hangs_fails_after_the_turn_timeout() -> None:
    started = anyio.current_time()
    report = await check_adapter("hangs:v1", factory=Hangs, turn_timeout=1)
    assert report.failed == list(PROPERTIES[:-1]), "\n".join(report.lines())
    assert "not checked: a turn took longer than 1 s" in report.result("events").figure
    assert anyio.current_time() - started < 15  # one timeout, then a bounded shutdown


async def test_cli_fails_a_broken_adapter_with_exit_1() -> None:
    code, out, err = await cli(
        "check-adapter", "no-usage:v1", "--factory", "tests.broken_adapters:NoUsage")
    assert code == 1, out + err
    lines = property_lines(out)
    assert lines["usage"].startswith("FAIL usage"), out
    assert "1 of 6 properties fail: usage" in err


async def test_cli_unknown_adapter_and_bad_factory_exit_2() -> None:
    code, _, err = await cli("check-adapter", "nosuch:x")
    assert code == 2 and "unknown adapter 'nosuch'" in err and "scripted" in err, err
    code, _, err = await cli("check-adapter", "x:y", "--factory", "no-colon")
    assert code == 2 and "--factory 'no-colon'" in err and "<module>:<attribute>" in err, err
    code, _, err = await cli("check-adapter", "x:y", "--factory", "tests.broken_adapters:Nope")
    assert code == 2 and "'tests.broken_adapters:Nope' cannot be loaded" in err, err


def test_cut_points_cover_every_index_or_a_spread_sample() -> None:
    assert _cut_points(8, 20) == list(range(1, 8))
    sample = _cut_points(500, 20)
    assert len(sample) >= 20 and sample[:3] == [1, 2, 3] and sample[-1] == 499
    assert sample == sorted(set(sample))


@pytest.mark.parametrize(
    ("after_cancel", "ended", "swallowed"),
    [
        (0, "finished", False),
        # one call raced with the cancel, then the end came without awaiting again
        (1, "finished", False),
        (1, "cancelled", False),
        # two calls that awaited while cancelled: the second one let nothing through
        (2, "finished", True),
        (2, "closed", True),
    ],
)
def test_one_call_may_race_with_the_cancel_two_are_a_swallow(
    after_cancel: int, ended: str, swallowed: bool
) -> None:
    run = StreamRun(0.0, after_cancel=after_cancel, ended=ended)
    assert run.swallowed_cancel is swallowed
