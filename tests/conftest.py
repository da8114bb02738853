"""Shared test configuration.

Fixtures live in plugin modules, one per area, so that they can grow
independently: ``tests/fixtures_db.py`` (databases), ``tests/fixtures_server.py``
(a real uvicorn server on 127.0.0.1).

Under ``CI=true`` nothing may pass by skipping: a run in which any test (or a
whole module, or an empty parameter set) was skipped fails, naming them.
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.fixtures_db", "tests.fixtures_server"]

_skipped: list[str] = []


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture
def anyio_backend() -> str:
    # `databases` is asyncio-only (it uses asyncio.current_task).
    return "asyncio"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _under_ci() and _skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _under_ci() and _skipped:
        terminalreporter.section("skipped under CI=true: that is a failure", red=True)
        for nodeid in _skipped:
            terminalreporter.line(nodeid)
