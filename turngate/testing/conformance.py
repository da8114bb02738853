"""Adapter conformance checks: what ``turngate check-adapter MODEL`` runs.

The adapter runs behind a live gateway (:func:`turngate.testing.live_server`,
a fresh SQLite file unless a database is given) with a thin probe between the
gateway and the adapter. The probe only watches (the time of each event,
whether the producer suspended, when and how the stream ended) and, for the
error check, throws an error into the stream. Each property is one
:class:`CheckResult` with the measured figure:

- ``events``: the adapter's events are well-formed and in order (tool-call
  fragments inside their call, usage before finish, nothing after finish), the
  browser's stream is a valid UI message stream, and the row holds what was
  streamed.
- ``usage``: the adapter reported usage (a final ``Usage`` event); otherwise the
  row's usage was estimated, and the check says so and fails.
- ``yields``: the producer suspends (yields to the event loop) at least once
  every :data:`MAX_EVENTS_PER_STEP` events, so other requests are served while
  it streams and a departed client's turn can be cancelled. The figure also
  counts another client's requests answered while the adapter produced its
  events.
- ``disconnect``: a browser leaving after k events, for every k of the reply
  (or a sample of at least :data:`MIN_CUTS` spread over a long one), stops the
  adapter within :data:`STOP_WITHIN` seconds without it swallowing the
  cancellation, and leaves the row final with the delivered prefix (what the
  gateway handed to the client's connection: at least what the client read, at
  most what the adapter produced) and one usage row.
- ``errors``: an error raised inside the adapter's stream (thrown in at its
  ``yield`` after a few events) reaches the browser as one safe ``error``
  chunk, and the row's status is ``error`` with one usage row.
- ``cleanup``: every stream the adapter opened was closed, and the adapter's
  ``aclose()`` ran when the gateway stopped.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio

from llm_adapters.base import Adapter, AdapterRequest, BaseAdapter
from llm_adapters.events import (
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    ToolResult,
    Usage,
)
from llm_adapters.registry import AdapterFactory, AdapterRegistry, parse_model
from turngate.exceptions import UpstreamProtocolError
from turngate.testing._server import LiveServer, live_server
from turngate.testing._stream import (
    Stream,
    open_turn,
    usage_summary,
    validate_ui_stream,
    wait_final,
)

#: The producer must suspend at least once every this many events (a burst parsed
#: from one network read is fine; a producer that never suspends is not).
MAX_EVENTS_PER_STEP = 32
#: A departed browser must stop the adapter within this many seconds.
STOP_WITHIN = 0.1
#: Long replies are cut at a sample of at least this many event indexes.
MIN_CUTS = 20
#: The events read before the error is thrown into the adapter's stream.
ERROR_AFTER = 3
#: The text of the injected error; it must never reach the browser.
INJECTED_ERROR = "conformance-check injected failure"

PROPERTIES = ("events", "usage", "yields", "disconnect", "errors", "cleanup")

#: A prompt that makes a model (or an echoing adapter) produce a reply of many events.
DEFAULT_PROMPT = (
    "Count from 1 to 120, the numbers separated by spaces, and write nothing else: "
    + " ".join(str(i) for i in range(1, 121))
)

_EVENT_TYPES = (
    TextDelta, ReasoningDelta, ToolCallStart, ToolCallDelta, ToolCallEnd, ToolResult, Usage,
    Finish,
)


@dataclass
class CheckResult:
    """One property: whether it holds, and the figure that was measured."""

    name: str
    ok: bool
    figure: str

    def line(self) -> str:
        """``PASS events     <figure>`` (what ``check-adapter`` prints)."""
        return f"{'PASS' if self.ok else 'FAIL'} {self.name:<10} {self.figure}"


@dataclass
class AdapterReport:
    """Every property checked for one model string."""

    model: str
    results: list[CheckResult]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def failed(self) -> list[str]:
        return [r.name for r in self.results if not r.ok]

    def result(self, name: str) -> CheckResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(f"no property {name!r}; expected one of {list(PROPERTIES)}")

    def lines(self) -> list[str]:
        return [r.line() for r in self.results]


# --- the probe ----------------------------------------------------------------------


def _cancel_delivered() -> bool:
    """The caller's cancel scope has been cancelled (anyio reports a deadline of -inf)."""
    return anyio.current_effective_deadline() == -math.inf


@dataclass
class StreamRun:
    """What the probe saw of one call of ``adapter.stream``."""

    started: float
    events: list[Any] = field(default_factory=list)
    #: per event: the producer suspended (the loop ran) while it was being made
    suspended: list[bool] = field(default_factory=list)
    #: per event: seconds spent inside the adapter's ``__anext__``
    busy: list[float] = field(default_factory=list)
    #: events (or a normal end) the adapter produced in a call that awaited while its
    #: task was cancelled: each is a cancellation it did not let through
    after_cancel: int = 0
    #: "finished", "cancelled", the name of the exception that ended it, or "" while running
    ended: str = ""
    ended_at: float = 0.0
    generator_closed: bool = False
    injected: bool = False
    swallowed_error: bool = False
    done: anyio.Event = field(default_factory=anyio.Event)

    @property
    def swallowed_cancel(self) -> bool:
        """It went on after a cancellation: more than the one call (an event, or its
        normal end) that can race with it. A cancel that lands while the adapter's last
        await is already resuming is seen only after that call returns; an end that
        follows without awaiting again never had a cancellation to let through."""
        return self.after_cancel >= 2

    def text(self) -> str:
        """The text deltas joined: the reply the adapter produced."""
        return "".join(e.text for e in self.events if type(e) is TextDelta)

    def longest_step(self) -> tuple[int, float]:
        """The most events made in one loop step, and how long they blocked the loop."""
        best, best_time, run, run_time = 0, 0.0, 0, 0.0
        for suspended, busy in zip(self.suspended, self.busy, strict=True):
            # Time blocked: what the events made without suspending took.
            run, run_time = (1, 0.0) if suspended or run == 0 else (run + 1, run_time + busy)
            if run > best or (run == best and run_time > best_time):
                best, best_time = run, run_time
        return best, best_time


class Probe(BaseAdapter):
    """The adapter under test, watched (see the module docstring)."""

    def __init__(self, inner: Adapter) -> None:
        super().__init__({})
        self.inner = inner
        self.name = inner.name
        self.runs: list[StreamRun] = []
        self.inject_error_after: int | None = None
        self.aclose_calls = 0
        self.aclose_error: str | None = None
        self.aclose_seconds = 0.0

    def validate_model(self, model: str) -> None:
        validate = getattr(self.inner, "validate_model", None)
        if validate is not None:
            validate(model)

    async def stream(self, request: AdapterRequest) -> AsyncGenerator[Any, None]:
        run = StreamRun(time.monotonic())
        self.runs.append(run)
        inner = self.inner.stream(request)
        inject_after, self.inject_error_after = self.inject_error_after, None
        loop = asyncio.get_running_loop()
        try:
            while True:
                ran = [False]
                handle = loop.call_soon(ran.__setitem__, 0, True)  # runs if the loop turns
                t0 = time.monotonic()
                try:
                    if inject_after is not None and len(run.events) == inject_after:
                        run.injected = True
                        event = await inner.athrow(UpstreamProtocolError(INJECTED_ERROR))
                        run.swallowed_error = True  # it yielded instead of raising
                    else:
                        event = await inner.__anext__()
                except StopAsyncIteration:
                    run.ended = "finished"
                    if ran[0] and _cancel_delivered():
                        run.after_cancel += 1
                    return
                finally:
                    handle.cancel()
                run.busy.append(time.monotonic() - t0)
                run.suspended.append(ran[0])
                run.events.append(event)
                if ran[0] and _cancel_delivered():
                    run.after_cancel += 1
                yield event
        except anyio.get_cancelled_exc_class():
            run.ended = "cancelled"
            raise
        except BaseException as exc:
            run.ended = run.ended or type(exc).__name__
            raise
        finally:
            run.ended = run.ended or "closed"
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await inner.aclose()
            run.generator_closed = getattr(inner, "ag_frame", None) is None
            run.ended_at = time.monotonic()
            run.done.set()

    async def aclose(self) -> None:
        self.aclose_calls += 1
        t0 = time.monotonic()
        try:
            await self.inner.aclose()
        except Exception as exc:
            self.aclose_error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.aclose_seconds = time.monotonic() - t0


# --- the checks ---------------------------------------------------------------------


def _event_order_problem(events: list[Any]) -> str | None:
    """Why ``events`` are not a well-formed adapter stream, or None."""
    open_calls: set[str] = set()
    ended_calls: set[str] = set()
    finished = False
    for i, event in enumerate(events):
        where = f"event {i} ({type(event).__name__})"
        if not isinstance(event, _EVENT_TYPES):
            return f"{where} is not an llm_adapters event; expected one of " + ", ".join(
                t.__name__ for t in _EVENT_TYPES
            )
        if finished:
            return f"{where} comes after Finish; expected Finish last"
        if isinstance(event, TextDelta | ReasoningDelta) and not isinstance(event.text, str):
            return f"{where} text is {event.text!r}; expected a str"
        if isinstance(event, ToolCallStart):
            if event.id in open_calls or event.id in ended_calls:
                return f"{where} starts tool call {event.id!r} again"
            open_calls.add(event.id)
        elif isinstance(event, ToolCallDelta | ToolCallEnd) and event.id not in open_calls:
            return f"{where} for tool call {event.id!r}, which is not open"
        if isinstance(event, ToolCallEnd):
            open_calls.discard(event.id)
            ended_calls.add(event.id)
        elif isinstance(event, ToolResult) and event.id not in ended_calls:
            return f"{where} for tool call {event.id!r} before its ToolCallEnd"
        elif isinstance(event, Usage) and (event.prompt_tokens < 0 or event.completion_tokens < 0):
            return f"{where} has negative token counts {event}"
        elif isinstance(event, Finish):
            finished = True
    if open_calls:
        return f"tool calls {sorted(open_calls)} never ended"
    return None


def _counts(events: list[Any]) -> str:
    def n(kind: type) -> int:
        return sum(type(e) is kind for e in events)

    return (f"text {n(TextDelta)}, reasoning {n(ReasoningDelta)}, tool calls "
            f"{n(ToolCallStart)}, usage {n(Usage)}, finish {n(Finish)}")


def _cut_points(length: int, cuts: int) -> list[int]:
    """Event counts to leave after: every one of 1..length-1, or ``cuts`` spread over it
    (always the first three and the last)."""
    every = list(range(1, length))
    if len(every) <= cuts:
        return every
    picked = {1, 2, 3, length - 1}
    for i in range(cuts):
        picked.add(1 + round(i * (length - 2) / max(1, cuts - 1)))
    return sorted(p for p in picked if 1 <= p < length)


class _Checker:
    def __init__(self, server: LiveServer, probe: Probe, model: str, prompt: str,
                 cuts: int, timeout: float) -> None:
        self.server = server
        self.probe = probe
        self.model = model
        self.prompt = prompt
        self.cuts = cuts
        self.timeout = timeout
        self.results: list[CheckResult] = []
        self.served_meanwhile = 0

    async def _turn(self, leave_after: int | None = None) -> tuple[Stream, StreamRun | None,
                                                                   float, str]:
        client = self.server.client
        thread = await self.server.new_thread()
        before = len(self.probe.runs)
        with anyio.fail_after(self.timeout):
            async with open_turn(client, thread, self.prompt, model=self.model) as turn:
                stream = await turn.read(leave_after)
            left = time.monotonic()
            run = self.probe.runs[before] if len(self.probe.runs) > before else None
            if run is not None:
                await run.done.wait()
        return stream, run, left, thread

    async def run(self) -> None:
        answered: list[float] = []
        streaming = anyio.Event()

        async def other_requests() -> None:
            # Another client's requests while the turn streams: each one answered
            # means the loop was free meanwhile.
            async with self.server.new_client() as other:
                await streaming.wait()
                while True:
                    if (await other.get("/healthz")).status_code == 200:
                        answered.append(time.monotonic())

        outcome: tuple[Stream, StreamRun | None, float, str] | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(other_requests)
            streaming.set()
            try:
                outcome = await self._turn()
            except TimeoutError:
                pass  # raised below, outside the task group (not as an exception group)
            tg.cancel_scope.cancel()
        if outcome is None:
            raise TimeoutError
        full, run, _, thread = outcome
        if run is not None:
            self.served_meanwhile = sum(run.started < t < run.ended_at for t in answered)
        if full.status != 200 or run is None:
            figure = (f"the turn answered {full.status} {full.body[:300]!r}; expected a 200 "
                      "stream from the adapter")
            self.results += [CheckResult(name, False, figure) for name in PROPERTIES[:-1]]
            return
        final = await wait_final(self.server.client, thread, within=self.timeout)
        self._check_events(full, run, final.message, final.text)
        self._check_usage(run, final.usage)
        self._check_yields(run)
        await self._check_disconnect(len(full.events))
        await self._check_errors(len(run.events))

    def timed_out(self) -> None:
        """Fail every property not checked yet: a turn outlived the turn timeout."""
        done = {r.name for r in self.results}
        for name in PROPERTIES[:-1]:
            if name not in done:
                self.results.append(CheckResult(
                    name, False, f"not checked: a turn took longer than {self.timeout:g} s "
                    "(the adapter never finished or never stopped)"))

    def _check_events(self, full: Stream, run: StreamRun, message: dict[str, Any],
                      stored: str) -> None:
        problems: list[str] = []
        if (problem := _event_order_problem(run.events)) is not None:
            problems.append(problem)
        if run.ended != "finished":
            problems.append(f"the stream ended by {run.ended}; expected it to finish")
        try:
            validate_ui_stream(full)
        except AssertionError as exc:
            problems.append(f"the UI stream is invalid: {exc}")
        if message["status"] != "complete":
            problems.append(f"the row's status is {message['status']!r}; expected 'complete'")
        if not stored == full.text == run.text():
            problems.append(f"stored text {stored[:60]!r}... != streamed {full.text[:60]!r}...")
        figure = f"{len(run.events)} events ({_counts(run.events)})"
        if problems:
            self.results.append(CheckResult("events", False, f"{figure}: {'; '.join(problems)}"))
        else:
            self.results.append(CheckResult(
                "events", True,
                f"{figure} in order; {len(full.events)} UI events valid; the row holds them",
            ))

    def _check_usage(self, run: StreamRun, rows: list[dict[str, Any]]) -> None:
        reported = [e for e in run.events if type(e) is Usage and e.final]
        if len(rows) != 1:
            self.results.append(CheckResult(
                "usage", False, f"{len(rows)} usage rows ({usage_summary(rows)}); expected 1"))
        elif not reported:
            self.results.append(CheckResult(
                "usage", False,
                f"no final Usage event: the row's usage was estimated ({usage_summary(rows)})"))
        elif rows[0]["estimated"]:
            self.results.append(CheckResult(
                "usage", False, f"Usage reported but the row is estimated ({usage_summary(rows)})"))
        else:
            last = reported[-1]
            self.results.append(CheckResult(
                "usage", True,
                f"reported: model {last.model!r}, prompt {last.prompt_tokens}, completion "
                f"{last.completion_tokens} (row estimated=False)"))

    def _check_yields(self, run: StreamRun) -> None:
        steps, seconds = run.longest_step()
        suspended = sum(run.suspended)
        figure = (f"at most {steps} of {len(run.events)} events in one loop step "
                  f"({seconds * 1000:.2f} ms); suspended before {suspended} events; "
                  f"{self.served_meanwhile} other requests answered while it produced them")
        ok = steps <= MAX_EVENTS_PER_STEP
        if not ok:
            figure += f"; expected at most {MAX_EVENTS_PER_STEP} (it blocks the event loop)"
        self.results.append(CheckResult("yields", ok, figure))

    async def _check_disconnect(self, length: int) -> None:
        points = _cut_points(length, max(self.cuts, MIN_CUTS))
        worst = 0.0
        mid, ended_first = 0, 0
        problems: list[str] = []
        done = 0
        for k in points:
            done += 1
            stream, run, left, thread = await self._turn(leave_after=k)
            if run is None:
                problems.append(f"cut {k}: the adapter was not called")
                continue
            final = await wait_final(self.server.client, thread, within=self.timeout)
            stopped = run.ended_at - left
            if run.ended == "finished" and not run.swallowed_cancel:
                # It ended by itself (before the client left, or racing with it).
                ended_first += 1
                expected = "complete"
            else:
                mid += 1
                expected = "cancelled"
            worst = max(worst, stopped)
            if stopped > STOP_WITHIN:
                problems.append(f"cut {k}: stopped {stopped * 1000:.0f} ms after the client "
                                f"left; expected within {STOP_WITHIN * 1000:.0f} ms")
            if run.swallowed_cancel:
                problems.append(f"cut {k}: swallowed the cancellation and went on "
                                f"({run.after_cancel} more events after it, ended: {run.ended})")
            if final.status != expected:
                problems.append(f"cut {k}: row status {final.status!r}; expected {expected!r}")
            # The row holds what the gateway handed to the client's connection: at least
            # what the client read before it left, at most what the adapter produced
            # (all of it when the adapter ended first).
            produced = run.text()
            if not (
                produced.startswith(final.text) and final.text.startswith(stream.text)
                and (expected == "cancelled" or final.text == produced)
            ):
                problems.append(f"cut {k}: stored text {final.text[-40:]!r} is not the "
                                f"delivered prefix: between what the client read "
                                f"({stream.text[-40:]!r}) and what was produced "
                                f"({produced[-40:]!r})")
            if len(final.usage) != 1:
                problems.append(f"cut {k}: {len(final.usage)} usage rows; expected 1")
            if len(problems) >= 3:
                break
        figure = (f"{done} of {len(points)} cuts of {length} events: stopped within "
                  f"{worst * 1000:.1f} ms at worst ({mid} cancelled mid-reply, "
                  f"{ended_first} had ended)")
        if problems:
            self.results.append(CheckResult("disconnect", False,
                                            f"{figure}; {'; '.join(problems[:3])}"))
        else:
            self.results.append(CheckResult(
                "disconnect", True, f"{figure}; rows final with the delivered prefix, "
                "one usage row each"))

    async def _check_errors(self, adapter_events: int) -> None:
        after = min(ERROR_AFTER, max(1, adapter_events // 2))
        self.probe.inject_error_after = after
        stream, run, _, thread = await self._turn()
        problems: list[str] = []
        if run is None or not run.injected:
            self.results.append(CheckResult(
                "errors", False, f"the stream ended before {after} events; no error was thrown"))
            return
        final = await wait_final(self.server.client, thread, within=self.timeout)
        errors = stream.of_type("error")
        finish = stream.of_type("finish")
        if run.swallowed_error:
            problems.append("the adapter swallowed the error and went on streaming")
        if len(errors) != 1:
            problems.append(f"{len(errors)} error chunks; expected 1")
        elif INJECTED_ERROR in errors[0]["errorText"]:
            problems.append(f"errorText {errors[0]['errorText']!r} leaks the error's own text")
        if not finish or finish[-1].get("finishReason") != "error":
            problems.append(f"finish chunks {finish}; expected finishReason 'error'")
        if final.status != "error":
            problems.append(f"row status {final.status!r}; expected 'error'")
        if len(final.usage) != 1:
            problems.append(f"{len(final.usage)} usage rows; expected 1")
        figure = f"error thrown in after {after} events"
        if problems:
            self.results.append(CheckResult("errors", False, f"{figure}: {'; '.join(problems)}"))
        else:
            self.results.append(CheckResult(
                "errors", True,
                f"{figure}: one error chunk {errors[0]['errorText']!r}, row status 'error', "
                "one usage row"))

    def check_cleanup(self) -> None:
        runs = self.probe.runs
        open_runs = sum(not r.generator_closed for r in runs)
        problems = []
        if open_runs:
            problems.append(f"{open_runs} of {len(runs)} streams left open after aclose()")
        if self.probe.aclose_calls != 1:
            problems.append(f"aclose() ran {self.probe.aclose_calls} times; expected once")
        if self.probe.aclose_error:
            problems.append(f"aclose() raised {self.probe.aclose_error}")
        figure = (f"{len(runs) - open_runs} of {len(runs)} streams closed; aclose() ran "
                  f"{self.probe.aclose_calls} time(s) at shutdown "
                  f"({self.probe.aclose_seconds * 1000:.1f} ms)")
        ok = not problems
        self.results.append(CheckResult("cleanup", ok,
                                        figure if ok else f"{figure}: {'; '.join(problems)}"))


def make_adapter(model: str, env: Mapping[str, str],
                 factory: AdapterFactory | None = None) -> Adapter:
    """The adapter a model string names, made as ``serve`` makes it (``UnknownAdapter``
    if no adapter has that name)."""
    name, _ = parse_model(model)
    if factory is not None:
        return factory(env)
    return AdapterRegistry(env).get(name)


async def check_adapter(
    model: str,
    *,
    env: Mapping[str, str] | None = None,
    database_url: str | None = None,
    factory: AdapterFactory | None = None,
    prompt: str = DEFAULT_PROMPT,
    cuts: int = MIN_CUTS,
    turn_timeout: float = 30.0,
) -> AdapterReport:
    """Check the adapter of ``model`` (``"<adapter>:<model>"``) behind a live gateway.

    ``env`` holds the adapter's settings (its base URL and key) and any gateway
    setting; ``check-adapter`` passes the process environment, as ``serve``
    reads it (but its ``DATABASE_URL`` and ``REDIS_URL``: the check runs one
    process on a fresh SQLite file, or on ``database_url``, migrated first).
    ``factory`` makes the adapter instead of the registry (an adapter
    not installed yet). ``turn_timeout`` bounds each turn, in seconds.
    """
    environ = dict(env or {})
    # One process on its own database: the deployment's database and Redis stay out.
    environ.pop("DATABASE_URL", None)
    environ.pop("REDIS_URL", None)
    # One reader per turn, cancelled when it leaves; the checks poll freely.
    environ.update({
        "TURNGATE_ON_DISCONNECT": "cancel",
        "TURNGATE_RATE_LIMIT_PER_MINUTE": "1000000",
        "TURNGATE_SHUTDOWN_GRACE_SECONDS": "1",  # a stream left hanging is not waited for
    })
    name, _ = parse_model(model)
    probe = Probe(make_adapter(model, environ, factory))

    def make_probe(_env: Mapping[str, str]) -> Adapter:
        return probe

    checker: _Checker | None = None
    async with live_server(database_url, env=environ, adapters={name: make_probe},
                           user="check-adapter",
                           migrate_database=database_url is not None) as server:
        checker = _Checker(server, probe, model, prompt, cuts, turn_timeout)
        try:
            await checker.run()
        except TimeoutError:
            checker.timed_out()
    checker.check_cleanup()
    return AdapterReport(model, checker.results)


__all__ = [
    "DEFAULT_PROMPT",
    "ERROR_AFTER",
    "INJECTED_ERROR",
    "MAX_EVENTS_PER_STEP",
    "MIN_CUTS",
    "PROPERTIES",
    "STOP_WITHIN",
    "AdapterReport",
    "CheckResult",
    "Probe",
    "StreamRun",
    "check_adapter",
    "make_adapter",
]
