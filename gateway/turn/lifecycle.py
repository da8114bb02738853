"""The turn lifecycle, top to bottom: open, launch, generate, readers leaving, finish.

One turn's path. The route (``gateway.api.turns``: parse, authenticate, limits)
calls ``attach_running`` (the same turn is generating here already: follow it)
and then ``open_turn``, which opens the turn in the database or finds it there (a
retry attaches, a finished turn replays: ``stream_turn``). ``TurnRunner.launch``
starts the generation as a task owned by the app's task group (``own_generations``),
not in the HTTP response: responses only *follow* a ``LiveTurn`` in the relay
(``gateway.streaming``). That is what lets a retried request attach instead of
generating twice, a dropped client resume, and the cancel route stop a generation
it does not own. ``_generate`` feeds the adapter's events to the encoder and the
relay. When the last reader leaves, ``on_unread`` applies the disconnect policy
(followers only report that they left). A generation ends in exactly one
``_finish``, run in ``finally`` under a shielded cancel scope: the final write
(``finalize.write_final``), then the closing chunks.

Beside it: ``accumulator`` (the reply and its usage), ``chunks`` (the AI SDK
encoder), ``finalize`` (the batched final write), ``replay`` (a stored turn's
stream), ``upkeep`` (checkpoints and leases of running turns).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from starlette.responses import Response

from gateway.replicas.follow import attach_shared, supersede_shared
from gateway.streaming.relay import LiveTurn, LocalRelay, SharedRelay
from gateway.streaming.responses import follow_live, sse_response
from gateway.turn.accumulator import ContentBuilder, TurnUsage
from gateway.turn.chunks import ChunkEncoder, events_of_chunks
from gateway.turn.finalize import FinalizeBatcher, write_final
from gateway.turn.replay import from_list, replay_chunks, stored_events, stored_usage
from gateway.turn.tools import (
    Answers,
    Toolbox,
    TurnSteps,
    check_answers,
    client_tools_json,
    client_tools_of,
    keep_pending,
    toolbox_for,
)
from llm_adapters.base import Adapter, AdapterRequest, ChatMessage, ToolSpec
from llm_adapters.events import FinishReason
from persistence import Store
from turngate.exceptions import UpstreamError

if TYPE_CHECKING:
    from gateway.context import AppContext
    from gateway.ops.metrics import Metrics
    from gateway.ops.settings import Settings
    from gateway.replicas.limits import SharedLimits
    from gateway.tools.servers import ToolHub
    from gateway.turn.titles import Titler
    from llm_adapters.pricing import PriceTable

logger = logging.getLogger("turngate.turns")

GENERIC_ERROR = "The reply failed because of an internal error."
# The stream's own words when its row could not be kept (docs/DECISIONS.md).
LEASE_LOST_ERROR = (
    "The reply was stopped: this gateway lost its claim on the turn to another process."
)
NOT_SAVED_ERROR = "The reply could not be saved; reloading may show less of it."
# The generation task's name: one string for every turn.
_GENERATE_TASK = "gateway.turn.lifecycle.TurnRunner._generate"


# -- opening: what the routes call after parsing, authentication and limits ------------


class Refused(Exception):
    """The turn cannot be started, regenerated or followed now.

    ``kind`` says why (``thread_not_found``, ``turn_not_found``, ``unauthorized``,
    ``unavailable``, ``thread_busy``, ``turn_in_progress``, ``not_last_turn``,
    ``shutting_down``); the route turns it into its HTTP answer.
    """

    def __init__(self, kind: str, message: str = "") -> None:
        super().__init__(message or kind)
        self.kind = kind
        self.message = message or kind


_THREAD_BUSY = "another turn is streaming on this thread"
_STILL_GENERATING = "the reply is still being generated; stop it first"


async def attach_running(
    ctx: AppContext, user_id: int, thread_id: str, turn_id: str
) -> Response | None:
    """The stream of ``turn_id`` if it is generating here already (a retry, a double
    submit: no database round trip), else None once the thread is free for it here.

    A turn of the thread that nobody reads any more is superseded (``supersede``);
    one that is read refuses with ``thread_busy``.
    """
    live = ctx.relay.get(thread_id, turn_id)
    if live is not None and live.owner_id == user_id and not live.overflowed:
        return sse_response(ctx, follow_live(ctx, live))
    running = ctx.relay.running_on_thread(thread_id)
    if (
        running is not None and running.owner_id == user_id and running.turn_id != turn_id
        and not await ctx.runner.supersede(running)
    ):
        raise Refused("thread_busy", _THREAD_BUSY)
    if ctx.runner.draining:
        raise Refused("shutting_down", "the server is shutting down")
    return None


async def open_turn(
    ctx: AppContext, user_id: int, thread_id: str, turn_id: str,
    content: list[dict[str, Any]], adapter: Adapter, model: str, model_string: str,
    started: float, *, key_prefix: str | None = None, key_hash: str | None = None,
    client_tools: Mapping[str, ToolSpec] | None = None,
) -> tuple[Response, bool]:
    """Open the turn; start its generation, or attach to or replay it if it exists.

    The flag says whether a generation started here (it then owns the stream slot).
    ``key_prefix``/``key_hash``: a cached key, checked by the open statement itself.
    ``client_tools``: tools the turn declares, which the client runs.
    """
    # The user's tools are known before anything is written (a failed read writes nothing).
    toolbox = await toolbox_for(ctx.runner.tools, ctx.store, user_id, client_tools)
    # A first turn's title from the user's words is written by the open itself.
    title = ctx.runner.titles.at_open(content) if ctx.runner.titles is not None else None
    opened = await ctx.store.open_turn(
        thread_id, user_id, turn_id, content,
        lease_owner=ctx.instance_id, lease_seconds=ctx.settings.lease_seconds,
        with_history=True, history_limit=ctx.settings.history_messages,
        key_prefix=key_prefix, key_hash=key_hash, title=title,
    )
    if opened.status in ("unavailable", "unauthorized", "thread_not_found"):
        raise Refused(opened.status)
    own_turn_busy = opened.status == "busy" and opened.busy_turn_id == turn_id
    if (
        opened.status == "busy" and not own_turn_busy and opened.busy_turn_id is not None
        and await supersede_shared(ctx, thread_id, opened.busy_turn_id, user_id)
    ):
        # Another replica's turn nobody reads any more ended for this one: open again.
        opened = await ctx.store.open_turn(
            thread_id, user_id, turn_id, content,
            lease_owner=ctx.instance_id, lease_seconds=ctx.settings.lease_seconds,
            with_history=True, history_limit=ctx.settings.history_messages, title=title,
        )
        if opened.status == "unavailable":
            raise Refused("unavailable")
        own_turn_busy = opened.status == "busy" and opened.busy_turn_id == turn_id
    if opened.status == "busy" and not own_turn_busy:
        raise Refused("thread_busy", _THREAD_BUSY)
    if own_turn_busy or not opened.assistant_inserted:
        # A retry or double submit: never a second generation. (The store never names
        # the request's own turn as the busy one; if it did, that turn is streaming,
        # which is an attach, not a conflict.)
        response = await stream_turn(ctx, user_id, thread_id, turn_id, -1)
        if response is None:
            raise Refused("unavailable")
        return response, False
    assert opened.assistant_message_id is not None and opened.user_message_id is not None
    # The earlier messages came back with the open, in the same round trip.
    history = history_messages(opened.history or [], turn_id)
    history.append(ChatMessage("user", content))
    live = LiveTurn(thread_id, turn_id, user_id, opened.assistant_message_id)
    request = AdapterRequest(model=model, messages=history)
    response = _launch(ctx, live, adapter, request, opened.user_message_id, model_string,
                       started, toolbox)
    if ctx.runner.titles is not None:  # after the reply's task: it starts first
        ctx.runner.titles.launched(ctx.runner, live, request, title if opened.titled else None)
    # The generation runs up to its first wait (a provider's request is sent) before
    # this response writes its head: the provider works on it meanwhile. Shielded: a
    # launched turn always gets its response.
    await anyio.lowlevel.cancel_shielded_checkpoint()
    return response, True


async def attach_to_regenerate(
    ctx: AppContext, user_id: int, thread_id: str, turn_id: str, replaces: int | None
) -> Response | None:
    """A regenerate of the turn generating here: attach to it, or stop it first.

    ``replaces``: the reply the client saw. A regenerate sent twice makes one new
    reply: the second finds it (replaces no longer current, or it streams with a
    reader) and attaches to it. A reply still streaming with nobody reading (a
    Stop, then Regenerate) is stopped first (what its reader was sent stays in the
    superseded row); one that names it and has a reader is refused.
    """
    live = ctx.relay.running_on_thread(thread_id)
    if live is not None and live.owner_id == user_id and live.turn_id == turn_id:
        if replaces is not None and replaces != live.message_id:
            # The reply the client saw was replaced already: a double click.
            return sse_response(ctx, follow_live(ctx, live))
        if replaces is None and not live.abandoned:
            # Someone reads it (a double click without an id): attach, do not restart.
            return sse_response(ctx, follow_live(ctx, live))
        if not await ctx.runner.supersede(live):
            raise Refused("thread_busy", _STILL_GENERATING)
    if ctx.runner.draining:
        raise Refused("shutting_down", "the server is shutting down")
    return None


async def open_regenerate(
    ctx: AppContext, user_id: int, thread_id: str, turn_id: str, replaces: int | None,
    adapter: Adapter, model: str, model_string: str, started: float,
) -> tuple[Response, bool]:
    """Answer the turn's user message again; the reply it had becomes ``superseded``.

    The flag says whether a generation started here (as ``open_turn``'s).
    """
    toolbox = await toolbox_for(ctx.runner.tools, ctx.store, user_id)
    opened = await ctx.store.regenerate_turn(
        thread_id, user_id, turn_id, replaces=replaces,
        lease_owner=ctx.instance_id, lease_seconds=ctx.settings.lease_seconds,
        history_limit=ctx.settings.history_messages,
    )
    if opened.status in ("unavailable", "thread_not_found", "turn_not_found"):
        raise Refused(opened.status)
    if opened.status == "not_last_turn":
        raise Refused(
            "not_last_turn",
            f"turn {turn_id[:40]!r} is not the thread's last; only the last reply "
            "can be regenerated",
        )
    if opened.status == "busy":
        raise Refused("thread_busy", _STILL_GENERATING)
    assert opened.assistant_message_id is not None and opened.user_message_id is not None
    if not opened.assistant_inserted:
        response = await stream_turn(
            ctx, user_id, thread_id, turn_id, -1, opened.assistant_message_id
        )
        if response is None:
            raise Refused("unavailable")
        return response, False
    history = history_messages(opened.history or [], turn_id)
    history.append(ChatMessage("user", opened.user_content or []))
    live = LiveTurn(thread_id, turn_id, user_id, opened.assistant_message_id)
    return _launch(ctx, live, adapter, AdapterRequest(model=model, messages=history),
                   opened.user_message_id, model_string, started, toolbox), True


def _launch(
    ctx: AppContext, live: LiveTurn, adapter: Adapter, request: AdapterRequest,
    user_message_id: int, model_string: str, started: float, toolbox: Toolbox | None = None,
) -> Response:
    """Start generating the opened turn; the response follows it from its first chunk."""
    ctx.runner.launch(
        live, adapter, request,
        user_message_id=user_message_id, model_string=model_string, started=started,
        toolbox=toolbox,
    )
    return sse_response(ctx, follow_live(ctx, live))


async def continue_turn(
    ctx: AppContext, user_id: int, thread_id: str, turn_id: str, answers: Answers,
    resolve: Callable[[str], tuple[Adapter, str]], started: float, *, lenient: bool = False,
) -> Response:
    """Continue a paused reply (``requires_action``) with ``answers``: the same
    assistant message, streamed from where it paused.

    ``lenient``: answers the reply does not wait for are dropped, not refused (a
    ``useChat`` resubmit carries every tool part of the message).

    The answers are checked against the stored reply first (``invalid_answer``, nothing
    written), the model resolved (``resolve`` may raise the route's error); then the
    row is claimed by one conditional UPDATE, so that a second answer, here or on
    another replica, is refused with ``not_paused`` instead of continuing twice.
    """
    if ctx.runner.draining:
        raise Refused("shutting_down", "the server is shutting down")
    store, settings = ctx.store, ctx.settings
    peek = await store.continue_turn(
        thread_id, user_id, turn_id, lease_owner=ctx.instance_id,
        lease_seconds=settings.lease_seconds, claim=False,
    )
    _refuse_continuation(peek.status, peek.assistant_status)
    if lenient:
        answers = keep_pending(peek.content, answers)
    problem = check_answers(peek.content, answers)
    if problem is not None:
        raise Refused("invalid_answer", problem)
    model_string = str(peek.resume_with.get("model") or settings.default_model)
    adapter, model = resolve(model_string)
    toolbox = await toolbox_for(ctx.runner.tools, store, user_id,
                                client_tools_of(peek.resume_with.get("clientTools")))
    claimed = await store.continue_turn(
        thread_id, user_id, turn_id, lease_owner=ctx.instance_id,
        lease_seconds=settings.lease_seconds, history_limit=settings.history_messages,
    )
    _refuse_continuation(claimed.status, claimed.assistant_status)
    assert claimed.assistant_message_id is not None and claimed.user_message_id is not None
    history = history_messages(claimed.history, turn_id)
    history.append(ChatMessage("user", claimed.user_content))
    content = ContentBuilder()
    for event in stored_events(claimed.content, claimed.event_map):
        content.feed(event)
    live = LiveTurn(thread_id, turn_id, user_id, claimed.assistant_message_id)
    ctx.runner.launch(
        live, adapter, AdapterRequest(model=model, messages=history),
        user_message_id=claimed.user_message_id, model_string=model_string, started=started,
        toolbox=replace(toolbox, client=client_tools_of(claimed.resume_with.get("clientTools"))),
        content=content, usage=TurnUsage.resumed(ctx.prices.cost_micros, claimed.call_details),
        answers=answers,
    )
    return sse_response(ctx, follow_live(ctx, live))


def _refuse_continuation(status: str, reply_status: str | None) -> None:
    if status in ("continued", "paused"):
        return
    if status == "not_paused":
        raise Refused("not_paused", f"the reply is not waiting for an answer (it is "
                                    f"{reply_status}); it was answered already or never paused")
    if status == "busy":
        raise Refused("thread_busy", _THREAD_BUSY)
    raise Refused(status)


async def stream_turn(
    ctx: AppContext, user_id: int, thread_id: str, turn_id: str, after: int,
    message_id: int | None = None,
) -> Response | None:
    """Stream an existing turn from SSE id ``after``: live from the relay (this
    replica's, else the shared one), else rebuilt from the database.

    None when the turn has no assistant row (nothing to resume). ``message_id``: the
    reply wanted, when the relay may still hold the one it replaced (regenerate).
    """
    live = ctx.relay.get(thread_id, turn_id)
    if (
        live is not None and live.owner_id == user_id and not live.overflowed
        and message_id in (None, live.message_id)
    ):
        return sse_response(ctx, follow_live(ctx, live, after))
    try:
        rows = await ctx.store.get_turn(thread_id, turn_id)
    except Exception as exc:
        logger.warning("turn_lookup_failed turn_id=%s: %s", turn_id,
                       str(exc) or type(exc).__name__,
                       extra={"event": "turn_lookup_failed", "turn_id": turn_id})
        raise Refused("unavailable") from None
    assistant = rows.assistant
    if assistant is None:
        return None
    if ctx.shared is not None and ctx.relay.get(thread_id, turn_id) is None:
        # Several replicas: the turn's stream as its generating replica relays it.
        shared = await attach_shared(
            ctx, thread_id, turn_id, after, assistant.status == "streaming", user_id
        )
        if shared is not None:
            return shared
    if assistant.status == "streaming":
        live = await ctx.relay.wait_for(
            thread_id, turn_id, within=2.0 if ctx.shared is None else 0.0,
            message_id=assistant.id,
        )
        if (
            live is not None and live.owner_id == user_id and live.message_id == assistant.id
            and not live.overflowed
        ):
            return sse_response(ctx, follow_live(ctx, live, after))
        raise Refused(
            "turn_in_progress", "this turn is being generated elsewhere; retry shortly"
        )
    usage = await stored_usage(ctx.store, user_id, thread_id, assistant.id)
    chunks = replay_chunks(
        message_id=assistant.id,
        user_message_id=rows.user.id if rows.user is not None else None,
        thread_id=thread_id,
        turn_id=turn_id,
        parts=assistant.content,
        status=assistant.status,
        usage=usage,
        event_map=assistant.event_map,
    )
    return sse_response(ctx, from_list(chunks, after))


def history_messages(rows: list[Any], turn_id: str) -> list[ChatMessage]:
    """The thread's earlier messages as adapter input (this turn's rows excluded)."""
    out: list[ChatMessage] = []
    for row in rows:
        if row.turn_id == turn_id:
            continue
        if row.role not in ("user", "assistant") or row.status in ("streaming", "superseded"):
            continue
        parts = [p for p in row.content if isinstance(p, dict) and p.get("type") != "status"]
        if parts:
            out.append(ChatMessage(row.role, parts))
    return out



# -- the generation: launched, generated, left by its readers, finished --------------


class TurnRunner:
    """Runs generations for this process and keeps them accounted for."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        relay: LocalRelay,
        prices: PriceTable,
        metrics: Metrics,
        instance_id: str,
    ) -> None:
        self.settings = settings
        self.store = store
        self.relay = relay
        self.prices = prices
        self.metrics = metrics
        self.instance_id = instance_id
        self.task_group: TaskGroup | None = None
        self.batcher = FinalizeBatcher(store)  # its ``run`` is started by the lifespan
        # With REDIS_URL (set by the lifespan): the relay between replicas, which turns
        # generated here are mirrored to, and the stream slots across replicas.
        self.shared: SharedRelay | None = None
        self.limits: SharedLimits | None = None
        # The MCP servers' tools (TURNGATE_MCP_CONFIG), started by the lifespan.
        self.tools: ToolHub | None = None
        self.titles: Titler | None = None  # set by create_app: a new thread's title
        self.draining = False
        self._idle = anyio.Event()
        # The generations running here: owned by ``own_generations``, a task of the app's
        # task group (see ``_start_generation``).
        self._generations: set[asyncio.Task[None]] = set()
        self._generation_failed: BaseException | None = None
        # Set when a drain's grace is over: final writes stop retrying (the process exits).
        self.give_up = anyio.Event()

    # -- starting ---------------------------------------------------------

    def launch(
        self,
        live: LiveTurn,
        adapter: Adapter,
        request: AdapterRequest,
        *,
        user_message_id: int,
        model_string: str,
        started: float,
        toolbox: Toolbox | None = None,
        content: ContentBuilder | None = None,
        usage: TurnUsage | None = None,
        answers: Answers | None = None,
    ) -> None:
        """Publish the opening chunks and start generating (``_start_generation``).

        ``content``, ``usage`` and ``answers``: a paused turn continuing (its parts
        and calls so far, and what the client answered)."""
        if self.task_group is None:
            raise RuntimeError("the turn runner is not started (no lifespan)")
        encoder = ChunkEncoder()
        steps = TurnSteps(
            live, adapter, request, encoder, model_string=model_string,
            toolbox=toolbox or Toolbox(self.tools), max_steps=self.settings.max_steps,
            cost=self.prices.cost_micros, content=content, usage=usage,
            on_first_event=lambda: self.metrics.time_to_first_token.observe(
                time.monotonic() - started),
        )
        live.publish(
            encoder.start(
                live.message_id,
                {"threadId": live.thread_id, "turnId": live.turn_id,
                 "userMessageId": str(user_message_id)},
            )
        )
        live.on_unread = self.on_unread
        self.relay.add(live)
        if self.shared is not None:
            # A continuation's stream replaces the paused one's copy there.
            self.task_group.start_soon(
                partial(self.shared.mirror, live, replace=content is not None)
            )
        if logger.isEnabledFor(logging.INFO):  # its fields are built only for a line written
            logger.info(
                "turn_start thread_id=%s turn_id=%s message_id=%s user_message_id=%s model=%s",
                live.thread_id, live.turn_id, live.message_id, user_message_id, model_string,
                extra={"event": "turn_start", "thread_id": live.thread_id,
                       "turn_id": live.turn_id, "message_id": live.message_id,
                       "user_message_id": user_message_id, "user_id": live.owner_id,
                       "model": model_string},
            )
        if self.settings.log_content and request.messages:
            # Message content only when asked for (TURNGATE_LOG_CONTENT), at debug level.
            logger.debug("turn_content turn_id=%s text=%r", live.turn_id,
                         request.messages[-1].text,
                         extra={"event": "turn_content", "turn_id": live.turn_id,
                                "text": request.messages[-1].text})
        self.metrics.generations_started.inc()
        self.metrics.active_generations.inc()
        self._start_generation(self._generate(live, steps, answers, model_string, started))

    def _start_generation(self, generate: Coroutine[Any, Any, None]) -> None:
        """Run ``generate`` in a task owned by ``own_generations``.

        Not a task started by the app's anyio task group: anyio (4.14 on) gives each
        such task a handle with its own cancel scope and event, held for as long as
        the turn runs (BENCHMARKS.md), and a generation needs neither: its own
        cancel scope (``LiveTurn.cancel``) is how it is stopped.
        """
        task = asyncio.get_running_loop().create_task(generate, name=_GENERATE_TASK)
        self._generations.add(task)
        task.add_done_callback(self._generation_ended)

    def _generation_ended(self, task: asyncio.Task[None]) -> None:
        self._generations.discard(task)
        if task.cancelled() or (error := task.exception()) is None:
            return
        # As a failing task of the app's task group would: the app's tasks stop, and
        # ``own_generations`` raises it.
        if self._generation_failed is None:
            self._generation_failed = error
        if self.task_group is not None:
            self.task_group.cancel_scope.cancel()

    async def own_generations(self) -> None:
        """A task of the app's task group that owns the generations: when it ends
        (the app stops, or a generation failed), every generation still running is
        interrupted (``LiveTurn.cancel``: it is finalized as ``interrupted``) and
        awaited, under a shield; a generation's failure is raised here."""
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                while self._generations:
                    for live in self.relay.running():
                        live.cancel("interrupted")
                    # A generation that has not entered its cancel scope yet is
                    # interrupted on the next round.
                    await asyncio.wait(tuple(self._generations), timeout=0.05)
            if self._generation_failed is not None:
                raise self._generation_failed

    # -- generating -------------------------------------------------------

    async def _generate(
        self,
        live: LiveTurn,
        steps: TurnSteps,
        answers: Answers | None,
        model_string: str,
        started: float,
    ) -> None:
        status = "interrupted"  # what an escaping cancellation (shutdown) means
        error_text: str | None = None
        live.content = steps.content
        try:
            with anyio.CancelScope() as scope:
                live.cancel_scope = scope
                if live.cancel_reason is not None:  # cancelled before it began
                    scope.cancel()
                # The model calls and tool calls (gateway.turn.tools).
                status, error_text = await steps.run(answers)
            if scope.cancelled_caught:
                status = live.cancel_reason or "cancelled"
        except UpstreamError as exc:
            status, error_text = "error", exc.safe_message
            steps.usage.failed(exc)  # a request that never reached the provider costs nothing
            self.metrics.upstream_errors.labels(steps.adapter.name).inc()
            # Our own words when nothing was sent ("OPENAI_API_KEY is not set"); never
            # the provider's error details.
            detail = "" if exc.reached_provider else f" ({exc})"
            logger.warning(
                "upstream_error turn_id=%s message_id=%s adapter=%s error=%s%s",
                live.turn_id, live.message_id, steps.adapter.name, type(exc).__name__, detail,
                extra={"event": "upstream_error", "turn_id": live.turn_id,
                       "message_id": live.message_id, "adapter": steps.adapter.name,
                       "error": type(exc).__name__},
            )
        except Exception:
            status, error_text = "error", GENERIC_ERROR
            logger.exception(
                "generation_failed turn_id=%s message_id=%s", live.turn_id, live.message_id
            )
        finally:
            # The adapter has stopped: the turn no longer generates, it is finalizing.
            # Nothing is left to cancel (a cancel now answers false; its final status
            # is the one it ended with, even if the write waits for the database).
            live.finalizing = True
            live.cancel_scope = None
            self.metrics.active_generations.dec()
            self.metrics.finalizing.inc()
            with anyio.CancelScope(shield=True):
                await self._finish(live, steps, status, error_text, model_string, started)

    async def _finish(
        self,
        live: LiveTurn,
        steps: TurnSteps,
        status: str,
        error_text: str | None,
        model_string: str,
        started: float,
    ) -> None:
        """Finalize the row and the usage, then end every reader's stream. Never raises."""
        content, usage, encoder = steps.content, steps.usage, steps.encoder
        try:
            # Tools still running when the turn stopped: their calls say so.
            stopped = steps.stop_running()
            # Whatever the provider never reported (disconnect, error, shutdown) is estimated.
            usage.settle(model_string, *steps.estimates())
            record = usage.record("chat")
            # Empty content is stored as the no-text marker by the store itself.
            parts, event_map = content.snapshot(), content.event_map()
            if status == "error" and error_text:
                # The reason is stored with the reply: a reload shows why it failed. The
                # event map keeps one entry per part (the error part streams no delta).
                parts.append({"type": "error", "errorText": error_text})
                if event_map:
                    event_map = [*event_map, None]
            sent_chunks = (
                live.complete_upto(live.keep_upto) if live.keep_upto is not None else None
            )
            if sent_chunks is not None and status == "cancelled":
                # The reader left and nobody came back: store what it was sent (and how
                # it was streamed), though the usage above counts every token generated.
                # (Past the relay's memory bound those chunks are gone: all is stored.)
                sent = ContentBuilder()
                for event in [*events_of_chunks(sent_chunks, content.provider_run()),
                              *stopped]:
                    sent.feed(event)
                parts, event_map = sent.snapshot(), sent.event_map()
            if status == "requires_action":
                await self._keep_for_continuation(live, steps, model_string)
            t0 = time.monotonic()
            outcome, attempts = await write_final(self, live, parts, event_map, status, record)
            self.metrics.finalize_duration.observe(time.monotonic() - t0)
            if live.lease_gone:
                error_text = LEASE_LOST_ERROR
            if outcome == "ok":
                # Counted only once the row is written: a retried write counts when it lands.
                self.metrics.turns_finalized.labels(status).inc()
            elif outcome == "failed":  # given up at shutdown: the row keeps its checkpoint
                error_text = NOT_SAVED_ERROR
            if self.titles is not None:  # a first turn titles its thread (before the end)
                await self.titles.after_turn(self, live, steps.base, content)
            logger.info(
                "turn_end thread_id=%s turn_id=%s message_id=%s status=%s tokens=%d "
                "cost_micros=%d estimated=%s finalize=%s attempts=%d duration_ms=%.1f",
                live.thread_id, live.turn_id, live.message_id, status, usage.total_tokens,
                usage.cost_micros, usage.estimated, outcome, attempts,
                (time.monotonic() - started) * 1000,
                extra={"event": "turn_end", "thread_id": live.thread_id,
                       "turn_id": live.turn_id, "message_id": live.message_id,
                       "status": status, "total_tokens": usage.total_tokens,
                       "prompt_tokens": usage.prompt_tokens,
                       "completion_tokens": usage.completion_tokens,
                       "cost_micros": usage.cost_micros, "estimated": usage.estimated,
                       "finalize": outcome, "attempts": attempts,
                       "duration_ms": round((time.monotonic() - started) * 1000, 1)},
            )
            if self.limits is not None:
                # Before the end goes out: a client that starts its next turn the
                # moment it reads [DONE] must find its slot free on every replica.
                await self.limits.release_stream(live.owner_id, live.thread_id, live.turn_id)
            finish_reason: FinishReason
            if error_text is not None and status != "error":
                finish_reason = "error"  # lost lease / not saved: the client is told
            elif status == "complete":
                finish_reason = encoder.finish_reason or "stop"
            elif status == "requires_action":
                finish_reason = "tool-calls"  # the client answers, then the turn continues
            elif status == "error":
                finish_reason = "error"
            else:
                finish_reason = "other"
            live.publish(
                encoder.end(
                    finish_reason, usage.metadata(), error_text=error_text,
                    aborted=status in ("cancelled", "interrupted"),
                )
            )
        except Exception:
            logger.exception("finish_failed message_id=%s", live.message_id)
        finally:
            live.finish(status)
            self.relay.ended(live)
            if live.keep_upto is not None:
                # Its relay copy has chunks past the stored reply: resume from the row.
                self.relay.forget(live)
            self.metrics.finalizing.dec()
            if self.draining and not self.relay.running():
                self._idle.set()

    async def _keep_for_continuation(
        self, live: LiveTurn, steps: TurnSteps, model_string: str
    ) -> None:
        """A paused turn keeps what its continuation needs: the model and client tools."""
        resume_with = {"model": model_string,
                       "clientTools": client_tools_json(steps.toolbox.client)}
        try:
            with anyio.fail_after(self.settings.finalize_timeout):
                await self.store.pause_turn(live.message_id, resume_with)
        except Exception as exc:  # the continuation then uses the default model
            logger.warning("pause_write_failed message_id=%s: %s", live.message_id,
                           str(exc) or type(exc).__name__,
                           extra={"event": "pause_write_failed", "message_id": live.message_id})

    # -- readers leaving (TURNGATE_ON_DISCONNECT) ---------------------------

    def on_unread(self, live: LiveTurn) -> None:
        """The last reader of a running turn left: apply the disconnect policy.

        ``cancel`` stops it now, ``grace`` after ``disconnect_grace_seconds`` unless a
        reader attaches or resumes meanwhile, ``continue`` never. Either way what is
        stored is what that last reader was sent. With several replicas a reader on
        another replica keeps it going too (asked of Redis, hence a task: this runs
        in a departing reader's ``finally``, often under cancellation).
        """
        policy = self.settings.on_disconnect
        if policy == "continue" or self.draining or self.task_group is None:
            return
        if policy == "cancel" and self.shared is None:
            live.cancel("cancelled", keep_upto=live.last_delivered)
            return
        grace = self.settings.disconnect_grace_seconds if policy == "grace" else 0.0
        self.task_group.start_soon(self._cancel_unless_read, live, grace)

    async def _cancel_unless_read(self, live: LiveTurn, grace: float) -> None:
        if grace > 0 and await live.wait_for_reader(grace):
            return
        if not live.abandoned or self.draining:
            return
        if self.shared is not None and (
            await self.shared.remote_readers(live.thread_id, live.turn_id) > 0
            or not live.abandoned
        ):
            return
        if live.cancel("cancelled", keep_upto=live.last_delivered):
            logger.info(
                "turn_unread_cancelled turn_id=%s message_id=%s after_grace=%s",
                live.turn_id, live.message_id, grace,
                extra={"event": "turn_unread_cancelled", "turn_id": live.turn_id,
                       "message_id": live.message_id, "grace_seconds": grace},
            )

    async def supersede(self, live: LiveTurn) -> bool:
        """End a running turn that nobody reads any more, for a new turn of its thread.

        Only under ``grace``, and only a turn whose readers all left (not one whose
        first reader has not arrived yet). Returns once it is finalized (its thread is
        free in the database); False if it may not be superseded.
        """
        if self.settings.on_disconnect != "grace" or not live.abandoned:
            return False
        if self.shared is not None and await self.shared.remote_readers(
            live.thread_id, live.turn_id
        ) > 0:
            return False
        if not live.cancel("cancelled", keep_upto=live.last_delivered):
            return live.done
        with anyio.move_on_after(self.settings.finalize_timeout + 1):
            await live.wait_done()
        return live.done

    async def drain(self, grace: float) -> None:
        """Stop taking turns; let running ones finish within ``grace``, then interrupt them."""
        self.draining = True
        if self.relay.running():
            with anyio.move_on_after(grace):
                await self._idle.wait()
        for live in self.relay.running():
            live.cancel("interrupted")
        # The process is leaving: a final write still failing gets the attempt it has in
        # flight (or one more) and is given up, before the streams are cut at shutdown
        # (grace + finalize timeout + 1 s). Its row keeps the last checkpoint for a reaper,
        # and its stream ends with an error that says the reply was not saved.
        self.give_up.set()
        if self.relay.running():
            with anyio.move_on_after(self.settings.finalize_timeout + 1):
                await self._idle.wait()  # set by the last _finish while draining


__all__ = [
    "GENERIC_ERROR", "LEASE_LOST_ERROR", "NOT_SAVED_ERROR", "Refused", "TurnRunner",
    "attach_running", "attach_to_regenerate", "continue_turn", "history_messages",
    "open_regenerate", "open_turn", "stream_turn",
]
