"""A new thread's title, given on its first turn without delaying the reply.

For a thread's first turn (its request has no earlier messages):

- without ``TURNGATE_TITLE_MODEL``: the first words of the user's text, written by the
  turn's open statement itself (``Store.open_turn(title=...)``: no round trip of its
  own), and announced just before the turn's closing chunks. A message without text
  is titled from the reply's first words once the turn's row is final (the stream's
  end waits for that write at most ``FALLBACK_WAIT_SECONDS``).
- with it: that model is asked for a short title from the user's text when the turn
  launches, in a task of the app's task group beside the reply (the reply's first
  token never waits for it, and the stream's end does not either). Its tokens are
  stored as their own ``token_usage`` row (``usage_type`` ``"title"``, ``message_id``
  NULL), also when the call fails, is cut or its title is not used. A failing model
  gives the first words instead; a drain cuts the call short the same way.

The writes are conditional: only an untitled thread whose first turn this is gets a
title, so a title the user set meanwhile wins. A title written while the turn's
stream is open goes to its readers as a transient ``data-title`` chunk (no SSE id,
never replayed) before ``finish``: the model's as soon as it is written, the first
words just before the end. A model title that lands after the stream ended is only
stored; the thread list returns it in any case.
"""

from __future__ import annotations

import json
import logging
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import anyio

from gateway.turn.accumulator import ContentBuilder, CostFn, TurnUsage, estimate_tokens
from llm_adapters.base import AdapterRequest, ChatMessage
from llm_adapters.events import TextDelta, Usage
from llm_adapters.registry import AdapterRegistry, parse_model
from persistence import Store, UsageRecord
from turngate.exceptions import PersistenceError, UpstreamError

if TYPE_CHECKING:
    from gateway.streaming.relay import LiveTurn
    from gateway.turn.lifecycle import TurnRunner

logger = logging.getLogger("turngate.titles")

#: The longest title the gateway gives (the user may set up to 500 characters).
TITLE_CHARS = 80
#: How long the stream's end waits for a first-words title to be written.
FALLBACK_WAIT_SECONDS = 1.0
#: How long the title model may take before its title is given up (first words instead).
MODEL_TIMEOUT_SECONDS = 30.0
#: How much of the conversation the title model reads, and how much of its answer.
PROMPT_USER_CHARS = 2000
PROMPT_REPLY_CHARS = 1000
ANSWER_CHARS = 300
#: How long a shutdown waits for the usage row of a title call it cut short.
SHUTDOWN_WRITE_SECONDS = 5.0
#: Attempts at the write that carries the title model's usage row (it was paid for).
USAGE_WRITE_ATTEMPTS = 3

TITLE_INSTRUCTIONS = (
    "You name chat conversations. Reply with a title of at most six words for the "
    "conversation below, in the language of the user's message: only the title, "
    "without quotes or a final period."
)


def first_words(text: str, limit: int = TITLE_CHARS) -> str | None:
    """The first words of ``text``, whitespace collapsed, at most ``limit`` characters
    (cut at a word boundary; a first word longer than that is cut); None if blank."""
    words = text.split()
    if not words:
        return None
    title = words[0][:limit]
    for word in words[1:]:
        if len(title) + 1 + len(word) > limit:
            break
        title += " " + word
    return title


def clean_title(answer: str) -> str | None:
    """A model's answer as a title: its first non-blank line without a ``Title:``
    label, Markdown emphasis or heading marks, surrounding quotes and a final period,
    then ``first_words``. None if nothing is left."""
    line = next((ln for ln in answer.splitlines() if ln.strip()), "")
    line = line.strip().lstrip("#").strip()
    if line.lower().startswith("title:"):
        line = line[len("title:"):]
    wrapping = "*_`\"'“”‘’«» "
    while True:  # "**\"Title\".**" → Title: marks and a final period, in any order
        stripped = line.strip(wrapping).rstrip(".")
        if stripped == line:
            return first_words(line)
        line = stripped


def title_chunk(thread_id: str, title: str) -> bytes:
    """The transient ``data-title`` chunk: an SSE event without an id."""
    chunk = {"type": "data-title", "data": {"threadId": thread_id, "title": title},
             "transient": True}
    return b"data: %s\n\n" % json.dumps(
        chunk, separators=(",", ":"), ensure_ascii=False
    ).encode()


def _prompt(user_text: str, reply_text: str) -> str:
    prompt = f"User:\n{user_text[:PROMPT_USER_CHARS]}"
    if reply_text.strip():
        prompt += f"\n\nAssistant:\n{reply_text[:PROMPT_REPLY_CHARS]}"
    return prompt


def _reply_text(content: ContentBuilder) -> str:
    return "\n\n".join(
        p["text"] for p in content.snapshot()
        if p.get("type") == "text" and isinstance(p.get("text"), str)
    )


class _ModelTitle:
    """A first turn's title model call, from its launch to the end of the turn's stream."""

    __slots__ = ("done", "scope")

    def __init__(self) -> None:
        self.done = anyio.Event()  # the title model's task has finished
        self.scope = anyio.CancelScope()  # the title model's call (a drain cuts it)


class Titler:
    """Titles threads on their first turn; one per app, on its ``TurnRunner``."""

    def __init__(
        self, store: Store, adapters: AdapterRegistry, cost: CostFn, model: str | None
    ) -> None:
        self.store = store
        self.adapters = adapters
        self.cost = cost
        self.model = model  # TURNGATE_TITLE_MODEL, "<adapter>:<model>"
        # The first turns launched here whose stream has not ended, by message id: the
        # title written at open (announced just before the turn's end), or the title
        # model's call. A title written at open holds no event or cancel scope for as
        # long as its turn streams.
        self._turns: dict[int, str | _ModelTitle] = {}

    def at_open(self, user_content: list[dict[str, Any]]) -> str | None:
        """The title the open statement gives an untitled thread on its first turn:
        the first words of the user's text, when no title model is set."""
        if self.model is not None:
            return None
        return first_words(ChatMessage("user", user_content).text)

    def launched(
        self, runner: TurnRunner, live: LiveTurn, request: AdapterRequest,
        titled: str | None,
    ) -> None:
        """A new turn's generation started; ``titled``: the title its open wrote.

        A first turn with ``TURNGATE_TITLE_MODEL`` set asks that model now, in a task
        of the app's task group beside the reply's. Never raises.
        """
        try:
            users = [m for m in request.messages if m.role == "user"]
            if len(users) != 1 or runner.task_group is None:
                return  # earlier turns in the history: not the first turn
            if titled is not None:
                self._turns[live.message_id] = titled
                return
            user_text = users[0].text
            if self.model is None or first_words(user_text) is None:
                return  # titled at its end (from the reply), or titled already
            turn = self._turns[live.message_id] = _ModelTitle()
            runner.task_group.start_soon(self._from_model, live, user_text, turn, self.model)
        except Exception:
            logger.exception("title_failed thread_id=%s", live.thread_id)

    async def after_turn(
        self, runner: TurnRunner, live: LiveTurn, request: AdapterRequest,
        content: ContentBuilder,
    ) -> None:
        """Called after the turn's final write, before its closing chunks. Never raises.

        A title written at open is announced now (``data-title``). A draining gateway
        cuts a title model's call short (the first words instead, its tokens booked),
        waiting at most ``FALLBACK_WAIT_SECONDS``. A first turn whose user message
        has no words is titled from the reply's, written now.
        """
        try:
            turn = self._turns.pop(live.message_id, None)
            if turn is not None:
                if isinstance(turn, str):
                    live.publish_transient(title_chunk(live.thread_id, turn))
                elif runner.draining:
                    turn.scope.cancel()
                    with anyio.move_on_after(FALLBACK_WAIT_SECONDS):
                        await turn.done.wait()
                return
            users = [m for m in request.messages if m.role == "user"]
            if (
                len(users) != 1 or runner.task_group is None
                or first_words(users[0].text) is not None
            ):
                return  # not a first turn; or its open (or the model) titles it
            fallback = first_words(_reply_text(content))
            if fallback is None:
                return  # no text on either side: nothing to title it with
            written = anyio.Event()
            runner.task_group.start_soon(self._from_reply, live, fallback, written)
            with anyio.move_on_after(FALLBACK_WAIT_SECONDS):
                await written.wait()
        except Exception:
            logger.exception("title_failed thread_id=%s", live.thread_id)

    async def _from_reply(self, live: LiveTurn, title: str, written: anyio.Event) -> None:
        try:
            if await self._write(live, title, None):
                self._titled(live, title, "first_words")
        except Exception:
            logger.exception("title_failed thread_id=%s", live.thread_id)
        finally:
            written.set()

    async def _from_model(
        self, live: LiveTurn, user_text: str, turn: _ModelTitle, model: str,
    ) -> None:
        """Ask the title model, write its title if the thread is still untitled, tell
        the readers while the turn streams. Runs beside the reply."""
        fallback = first_words(user_text) or ""
        try:
            if not await self.store.thread_needs_title(
                live.thread_id, live.owner_id, live.turn_id
            ):
                return  # titled already (by its creator or the user): pay nothing
            call = _ModelCall(model, _prompt(user_text, ""), TurnUsage(self.cost))
            answer: str | None = None
            try:
                with turn.scope:
                    answer = await self._ask(call, live)
            except anyio.get_cancelled_exc_class():
                # Shutdown: the tokens spent so far are still booked (estimated).
                with anyio.move_on_after(SHUTDOWN_WRITE_SECONDS, shield=True):
                    await self._write(live, fallback, call.record(), attempts=1)
                raise
            title, source = (answer, "model") if answer is not None else (
                fallback, "first_words")
            if await self._write(live, title, call.record()):
                self._titled(live, title, source)
        except Exception:
            logger.exception("title_failed thread_id=%s", live.thread_id)
        finally:
            turn.done.set()

    def _titled(self, live: LiveTurn, title: str, source: str) -> None:
        logger.info(
            "thread_titled thread_id=%s source=%s", live.thread_id, source,
            extra={"event": "thread_titled", "thread_id": live.thread_id,
                   "turn_id": live.turn_id, "source": source},
        )
        live.publish_transient(title_chunk(live.thread_id, title))

    async def _write(
        self, live: LiveTurn, title: str, usage: UsageRecord | None, attempts: int = 0
    ) -> bool:
        """The conditional title write; retried while it carries a usage row."""
        attempts = attempts or (USAGE_WRITE_ATTEMPTS if usage is not None else 1)
        for attempt in range(1, attempts + 1):
            try:
                return await self.store.set_title_if_untitled(
                    live.thread_id, live.owner_id, live.turn_id, title, usage=usage
                )
            except PersistenceError as exc:
                if attempt == attempts:
                    tokens = usage.total_tokens if usage else 0
                    cost = usage.cost_micros if usage else 0
                    logger.warning(
                        "title_write_failed thread_id=%s tokens=%d cost_micros=%d: %s",
                        live.thread_id, tokens, cost, exc,
                        extra={"event": "title_write_failed", "thread_id": live.thread_id,
                               "total_tokens": tokens, "cost_micros": cost},
                    )
                    return False
                await anyio.sleep(0.5 * attempt)
        return False

    async def _ask(self, call: _ModelCall, live: LiveTurn) -> str | None:
        """The title model's answer, cleaned; None if it failed or said nothing usable.

        Its usage is collected in ``call``, whatever happens.
        """
        name, model = parse_model(call.model_string)
        try:
            adapter = self.adapters.get(name)
            validate = getattr(adapter, "validate_model", None)
            if validate is not None:
                validate(model)
        except Exception as exc:
            call.unsent = True
            logger.warning(
                "title_model_unusable model=%s: %s", call.model_string, exc,
                extra={"event": "title_model_unusable", "model": call.model_string},
            )
            return None
        request = AdapterRequest(
            model=model,
            messages=[ChatMessage("user", [{"type": "text", "text": call.prompt}])],
            options={"system": TITLE_INSTRUCTIONS},
        )
        error = ""
        try:
            with anyio.fail_after(MODEL_TIMEOUT_SECONDS):
                async with aclosing(adapter.stream(request)) as events:
                    async for event in events:
                        if type(event) is Usage:
                            call.usage.add(event)
                        elif isinstance(event, TextDelta):
                            call.pieces.append(event.text)
                            if sum(map(len, call.pieces)) > ANSWER_CHARS:
                                break  # a title is short; closing stops the tokens
            return clean_title("".join(call.pieces))
        except UpstreamError as exc:
            call.usage.failed(exc)
            error = type(exc).__name__
        except TimeoutError:
            error = "timeout"
        except Exception as exc:
            logger.exception("title_model_crashed model=%s", call.model_string)
            error = type(exc).__name__
        logger.warning(
            "title_model_failed thread_id=%s model=%s error=%s", live.thread_id,
            call.model_string, error,
            extra={"event": "title_model_failed", "thread_id": live.thread_id,
                   "model": call.model_string, "error": error},
        )
        return None


class _ModelCall:
    """One call of the title model: its prompt, what it answered, its usage."""

    def __init__(self, model_string: str, prompt: str, usage: TurnUsage) -> None:
        self.model_string = model_string
        self.prompt = prompt
        self.usage = usage
        self.pieces: list[str] = []
        self.unsent = False  # the adapter could not even be loaded: nothing was spent

    def record(self) -> UsageRecord | None:
        """The usage row of the call: what the provider reported, the rest estimated."""
        if self.unsent:
            return None
        name, model = parse_model(self.model_string)
        self.usage.settle(
            f"{name}:{model}" if model else name,
            estimate_tokens(len(TITLE_INSTRUCTIONS) + len(self.prompt)),
            estimate_tokens(sum(map(len, self.pieces))),
        )
        return self.usage.record("title")


__all__ = [
    "FALLBACK_WAIT_SECONDS", "MODEL_TIMEOUT_SECONDS", "TITLE_CHARS", "TITLE_INSTRUCTIONS",
    "Titler", "clean_title", "first_words", "title_chunk",
]
