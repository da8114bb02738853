"""The turn lifecycle: open, generate, stream, finalize.

A turn's generation runs as a task in the application's task group, not in
the HTTP response: responses only *follow* a ``LiveTurn`` in the relay. That
is what lets a retried request attach instead of generating twice, a dropped
client resume, and the cancel route stop a generation it does not own. A
generation ends in exactly one finalize, written in ``finally`` under a
shielded cancel scope with a deadline.
"""

from __future__ import annotations

import logging
import time
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from gateway.streaming.relay import LiveTurn, LocalRelay, SharedRelay
from gateway.turn.accumulator import ContentBuilder, TurnUsage, estimate_tokens
from gateway.turn.chunks import ChunkEncoder, events_of_chunks
from llm_adapters.base import Adapter, AdapterRequest, ChatMessage
from llm_adapters.events import FinishReason, Usage
from persistence import Store, UsageRecord
from turngate.exceptions import RelayError, UpstreamError

if TYPE_CHECKING:
    from gateway.ops.metrics import Metrics
    from gateway.ops.settings import Settings
    from gateway.replicas.limits import SharedLimits
    from llm_adapters.pricing import PriceTable

logger = logging.getLogger("turngate.turns")

GENERIC_ERROR = "The reply failed because of an internal error."
# The stream's own words when its row could not be kept (docs/DECISIONS.md).
LEASE_LOST_ERROR = (
    "The reply was stopped: this gateway lost its claim on the turn to another process."
)
NOT_SAVED_ERROR = "The reply could not be saved; reloading may show less of it."
# Backoff of a final write that failed: the first retry at once-ish, then doubling up
# to half a checkpoint interval (at most 1 s), so a thread whose final write waited on
# the database is free again within a checkpoint interval of its return.
RETRY_FIRST_SECONDS = 0.05
RETRY_MAX_SECONDS = 1.0


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
        self.mirror: SharedRelay | None = None  # copies turns to other replicas
        self.limits: SharedLimits | None = None  # stream slots across replicas
        self.draining = False
        self._idle = anyio.Event()
        # Set when a drain's grace is over: final writes stop retrying (the process exits).
        self._give_up = anyio.Event()

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
    ) -> None:
        """Publish the opening chunks and start generating in the app's task group."""
        if self.task_group is None:
            raise RuntimeError("the turn runner is not started (no lifespan)")
        encoder = ChunkEncoder()
        live.publish(
            encoder.start(
                live.message_id,
                {"threadId": live.thread_id, "turnId": live.turn_id,
                 "userMessageId": str(user_message_id)},
            )
        )
        live.on_unread = self.on_unread
        self.relay.add(live)
        if self.mirror is not None:
            self.task_group.start_soon(self.mirror.mirror, live)
        logger.info(
            "turn_start thread_id=%s turn_id=%s message_id=%s user_message_id=%s model=%s",
            live.thread_id, live.turn_id, live.message_id, user_message_id, model_string,
            extra={"event": "turn_start", "thread_id": live.thread_id, "turn_id": live.turn_id,
                   "message_id": live.message_id, "user_message_id": user_message_id,
                   "user_id": live.owner_id, "model": model_string},
        )
        if self.settings.log_content and request.messages:
            # Message content only when asked for (TURNGATE_LOG_CONTENT), at debug level.
            logger.debug("turn_content turn_id=%s text=%r", live.turn_id,
                         request.messages[-1].text,
                         extra={"event": "turn_content", "turn_id": live.turn_id,
                                "text": request.messages[-1].text})
        self.metrics.generations_started.inc()
        self.metrics.active_generations.inc()
        self.task_group.start_soon(
            self._generate, live, adapter, request, encoder, model_string, started
        )

    # -- generating -------------------------------------------------------

    async def _generate(
        self,
        live: LiveTurn,
        adapter: Adapter,
        request: AdapterRequest,
        encoder: ChunkEncoder,
        model_string: str,
        started: float,
    ) -> None:
        content = ContentBuilder()
        usage = TurnUsage(self.prices.cost_micros)
        status = "interrupted"  # what an escaping cancellation (shutdown) means
        error_text: str | None = None
        first_token = True
        live.content = content
        try:
            with anyio.CancelScope() as scope:
                live.cancel_scope = scope
                if live.cancel_reason is not None:  # cancelled before it began
                    scope.cancel()
                async with aclosing(adapter.stream(request)) as events:
                    async for event in events:
                        if type(event) is Usage:
                            usage.add(event)
                            continue
                        if first_token:
                            first_token = False
                            self.metrics.time_to_first_token.observe(time.monotonic() - started)
                        content.feed(event)
                        live.publish(encoder.feed(event))
                status = "complete"
            if scope.cancelled_caught:
                status = live.cancel_reason or "cancelled"
        except UpstreamError as exc:
            status, error_text = "error", exc.safe_message
            usage.failed(exc)  # a request that never reached the provider costs nothing
            self.metrics.upstream_errors.labels(adapter.name).inc()
            # Our own words when nothing was sent ("OPENAI_API_KEY is not set"); never
            # the provider's error details.
            detail = "" if exc.reached_provider else f" ({exc})"
            logger.warning(
                "upstream_error turn_id=%s message_id=%s adapter=%s error=%s%s",
                live.turn_id, live.message_id, adapter.name, type(exc).__name__, detail,
                extra={"event": "upstream_error", "turn_id": live.turn_id,
                       "message_id": live.message_id, "adapter": adapter.name,
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
                await self._finish(
                    live, request, content, usage, encoder, status, error_text, model_string,
                    started,
                )

    async def _finish(
        self,
        live: LiveTurn,
        request: AdapterRequest,
        content: ContentBuilder,
        usage: TurnUsage,
        encoder: ChunkEncoder,
        status: str,
        error_text: str | None,
        model_string: str,
        started: float,
    ) -> None:
        """Finalize the row and the usage, then end every reader's stream. Never raises."""
        try:
            # Whatever the provider never reported (disconnect, error, shutdown) is estimated.
            prompt_chars = sum(len(m.text) for m in request.messages)
            usage.settle(
                model_string, estimate_tokens(prompt_chars), estimate_tokens(content.text_length())
            )
            record = UsageRecord(
                usage_type="chat",
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                total_tokens=usage.total_tokens,
                cost_micros=usage.cost_micros,
                model_breakdown=usage.model_breakdown(),
                call_details=usage.call_details(),
                estimated=usage.estimated,
            )
            parts, event_map = content.final(), content.event_map()
            if status == "error" and error_text:
                # The reason is stored with the reply: a reload shows why it failed. The
                # event map keeps one entry per part (the error part streams no delta).
                parts = [p for p in parts if p.get("type") != "status"]
                parts.append({"type": "error", "errorText": error_text})
                if event_map:
                    event_map = [*event_map, None]
            if live.keep_upto is not None and status == "cancelled":
                # The reader left and nobody came back: store what it was sent (and how
                # it was streamed), though the usage above counts every token generated.
                sent = ContentBuilder()
                for event in events_of_chunks(live.events[: live.keep_upto + 1]):
                    sent.feed(event)
                parts, event_map = sent.final(), sent.event_map()
            t0 = time.monotonic()
            outcome, attempts = await self._write_final(live, parts, event_map, status, record)
            self.metrics.finalize_duration.observe(time.monotonic() - t0)
            if live.lease_gone:
                error_text = LEASE_LOST_ERROR
            if outcome == "ok":
                # Counted only once the row is written: a retried write counts when it lands.
                self.metrics.turns_finalized.labels(status).inc()
            elif outcome == "failed":  # given up at shutdown: the row keeps its checkpoint
                error_text = NOT_SAVED_ERROR
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
        if policy == "cancel" and self.mirror is None:
            live.cancel("cancelled", keep_upto=live.last_delivered)
            return
        grace = self.settings.disconnect_grace_seconds if policy == "grace" else 0.0
        self.task_group.start_soon(self._cancel_unless_read, live, grace)

    async def _cancel_unless_read(self, live: LiveTurn, grace: float) -> None:
        if grace > 0 and await live.wait_for_reader(grace):
            return
        if not live.abandoned or self.draining:
            return
        if self.mirror is not None and (
            await self.mirror.remote_readers(live.thread_id, live.turn_id) > 0
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
        if self.mirror is not None and await self.mirror.remote_readers(
            live.thread_id, live.turn_id
        ) > 0:
            return False
        if not live.cancel("cancelled", keep_upto=live.last_delivered):
            return live.done
        with anyio.move_on_after(self.settings.finalize_timeout + 1):
            await live.wait_done()
        return live.done

    async def _write_final(
        self, live: LiveTurn, parts: list[dict[str, Any]], event_map: list[Any], status: str,
        record: UsageRecord,
    ) -> tuple[str, int]:
        """Write the turn's final row and usage until it lands; ``(outcome, attempts)``.

        A write that fails (database down, locked, pool exhausted) is retried with
        backoff for as long as the process lives; meanwhile the turn stays in
        ``relay.running()``, so the maintenance loop keeps renewing its lease and no
        reaper takes it. Ends with ``ok`` (written),
        ``row_missing`` (the row is not ours to write: deleted, superseded, final
        already) or, only once a drain gave up on it, ``failed``.
        """
        from gateway.turn.finalize import finalize  # batched with the turns ending meanwhile

        attempts = 0
        delay = RETRY_FIRST_SECONDS
        cap = min(RETRY_MAX_SECONDS, self.settings.checkpoint_seconds / 2)
        while True:
            attempts += 1
            # The lock waits for a checkpoint of this turn still in flight (bounded by
            # the store's deadline), so a reclaim cannot follow the final write.
            async with live.db_lock:
                outcome = await finalize(
                    self, live.message_id, live.thread_id, live.owner_id, parts, status,
                    record, event_map,
                )
            if outcome == "row_missing" and attempts > 1:
                outcome = await self._written_already(live, status)
            if outcome != "failed" or self._give_up.is_set():
                return outcome, attempts
            self.metrics.finalize_retries.inc()
            if attempts == 1:
                logger.warning(
                    "finalize_retrying message_id=%s status=%s", live.message_id, status,
                    extra={"event": "finalize_retrying", "message_id": live.message_id,
                           "thread_id": live.thread_id, "turn_id": live.turn_id,
                           "status": status},
                )
            with anyio.move_on_after(delay):
                await self._give_up.wait()
            delay = min(delay * 2, cap)

    async def _written_already(self, live: LiveTurn, status: str) -> str:
        """After a failed attempt, ``row_missing`` may mean that attempt committed and
        only its answer was lost: the row already holds our status."""
        try:
            rows = await self.store.get_turn(live.thread_id, live.turn_id)
        except Exception:
            return "failed"
        row = rows.assistant
        if row is not None and row.id == live.message_id and row.status == status:
            return "ok"
        return "row_missing"

    # -- upkeep -----------------------------------------------------------

    async def checkpoint_running(self) -> None:
        """Save the partial content of running turns that changed; renew the other leases.

        Leases belong to generations that are running or whose final write is
        being retried, nothing else: the renewal names exactly those rows. Turns
        whose content did not change since their last checkpoint (idle streams,
        slow upstreams) and turns that are finalizing cost nothing per turn: one
        statement renews them all. A row missing from a checkpoint or a renewal
        (a reaper marked it ``interrupted`` after a stall longer than the lease) is
        taken back at once, or, if that is refused, its generation is stopped
        (``_lease_lost``).
        """
        renew: list[LiveTurn] = []
        for live in self.relay.running():
            content = live.content
            if live.done:
                continue
            if (
                live.finalizing
                or not isinstance(content, ContentBuilder)
                or content.version == live.checkpointed_version
            ):
                renew.append(live)
                continue
            await self._checkpoint(live, content)
        if not renew:
            return
        renewed = await self.store.renew_leases(
            self.instance_id, self.settings.lease_seconds, [t.message_id for t in renew]
        )
        for live in renew:
            if live.message_id not in renewed and not live.finalizing and not live.done:
                content = live.content
                await self._checkpoint(
                    live, content if isinstance(content, ContentBuilder) else None,
                    lost=True,
                )

    async def _checkpoint(
        self, live: LiveTurn, content: ContentBuilder | None, *, lost: bool = False
    ) -> None:
        async with live.db_lock:
            if live.finalizing or live.done:
                return  # its final write has begun: the row is no longer a checkpoint's
            version = content.version if content is not None else live.checkpointed_version
            parts = content.snapshot() if content is not None else [{"type": "text", "text": ""}]
            stream_map = content.event_map() if content is not None else []
            if not lost and await self.store.checkpoint(
                live.message_id, parts, lease_owner=self.instance_id,
                lease_seconds=self.settings.lease_seconds, event_map=stream_map,
            ):
                live.checkpointed_version = version
                return
            await self._lease_lost(live, parts, stream_map, version)

    async def _lease_lost(
        self, live: LiveTurn, parts: list[dict[str, Any]], stream_map: list[Any], version: int
    ) -> None:
        """Our row was not ours any more: take it back, or stop the generation.

        Taking it back works when a reaper marked it ``interrupted`` (the owner
        outlived its lease: a stall, a lock, a partition) and no other turn streams
        on the thread; the reply then goes on as if nothing happened. Otherwise
        (another turn started on the thread, the row is gone) the generation stops;
        its final write stores the content so far as ``interrupted`` and the stream
        ends with an ``error`` chunk that says why.
        """
        reclaimed = await self.store.checkpoint(
            live.message_id, parts, lease_owner=self.instance_id,
            lease_seconds=self.settings.lease_seconds, reclaim=True, event_map=stream_map,
        )
        fields = {"message_id": live.message_id, "thread_id": live.thread_id,
                  "turn_id": live.turn_id}
        if reclaimed:
            live.checkpointed_version = version
            logger.warning("lease_reclaimed message_id=%s", live.message_id,
                           extra={"event": "lease_reclaimed", **fields})
            return
        logger.warning("lease_lost message_id=%s: generation stopped", live.message_id,
                       extra={"event": "lease_lost", **fields})
        live.lease_gone = True
        live.cancel("interrupted")

    async def _renew_stream_holds(self, limits: SharedLimits) -> None:
        running = [(t.owner_id, t.thread_id, t.turn_id) for t in self.relay.running()]
        if not running:
            return
        try:
            await limits.renew_streams(running)
        except RelayError:
            pass  # Redis is away (logged there); new turns get 503 meanwhile

    async def maintain(self) -> None:
        """Periodic upkeep: checkpoints, lease renewal, crash recovery, relay sweep."""
        while True:
            await anyio.sleep(self.settings.checkpoint_seconds)
            try:
                await self.checkpoint_running()
                if self.limits is not None:
                    await self._renew_stream_holds(self.limits)
                await self.store.recover_expired_turns()
                self.relay.sweep()
            except Exception as exc:
                # One line per failed pass, naming the cause; the traceback only at debug.
                logger.warning("maintenance_failed: %s", str(exc) or type(exc).__name__,
                               exc_info=logger.isEnabledFor(logging.DEBUG),
                               extra={"event": "maintenance_failed"})

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
        self._give_up.set()
        if self.relay.running():
            with anyio.move_on_after(self.settings.finalize_timeout + 1):
                await self._idle.wait()  # set by the last _finish while draining


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


__all__ = ["GENERIC_ERROR", "TurnRunner", "history_messages"]
