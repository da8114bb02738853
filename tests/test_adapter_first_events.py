"""A whole short answer in one network read: the provider adapters let the first
events out (the event loop runs the readers) before they work through the rest of
that read, so the first token is not held back by the answer's end and final write.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from llm_adapters.anthropic import AnthropicAdapter
from llm_adapters.base import AdapterRequest, ChatMessage
from llm_adapters.events import AdapterEvent, Finish, TextDelta
from llm_adapters.openai import OpenAIAdapter

pytestmark = pytest.mark.anyio


def _frame(obj: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj)}\n\n".encode()


def _openai_body() -> bytes:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": "c", "model": "m", "choices": [
            {"index": 0, "delta": delta, "finish_reason": finish}]}

    return b"".join([
        _frame(chunk({"role": "assistant", "content": ""})),
        *(_frame(chunk({"content": t})) for t in ("a", "b", "c")),
        _frame(chunk({}, "stop")),
        _frame({"id": "c", "model": "m", "choices": [],
                "usage": {"prompt_tokens": 2, "completion_tokens": 3}}),
        b"data: [DONE]\n\n",
    ])


def _anthropic_body() -> bytes:
    return b"".join([
        _frame({"type": "message_start", "message": {
            "model": "m", "usage": {"input_tokens": 2, "output_tokens": 1}}}, "message_start"),
        _frame({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}, "content_block_start"),
        *(_frame({"type": "content_block_delta", "index": 0,
                  "delta": {"type": "text_delta", "text": t}}, "content_block_delta")
          for t in ("a", "b", "c")),
        _frame({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        _frame({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": 3}}, "message_delta"),
        _frame({"type": "message_stop"}, "message_stop"),
    ])


@asynccontextmanager
async def _one_write_upstream(body: bytes) -> AsyncIterator[str]:
    """An upstream that answers every request with ``body`` in one write."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.decode().split("\r\n"):
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


def _adapter(kind: str, url: str) -> OpenAIAdapter | AnthropicAdapter:
    if kind == "openai":
        return OpenAIAdapter({"OPENAI_BASE_URL": url + "/v1", "OPENAI_API_KEY": "k"})
    return AnthropicAdapter({"ANTHROPIC_BASE_URL": url, "ANTHROPIC_API_KEY": "k"})


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_a_reader_runs_before_the_rest_of_the_read_is_worked_through(
    kind: str,
) -> None:
    body = _openai_body() if kind == "openai" else _anthropic_body()
    request = AdapterRequest("m", [ChatMessage("user", [{"type": "text", "text": "hi"}])])
    seen: list[AdapterEvent] = []
    saw: list[AdapterEvent] | None = None
    first = anyio.Event()

    async def reader() -> None:
        # As a relay reader: woken by the publish, then one tick to gather more.
        nonlocal saw
        await first.wait()
        await anyio.lowlevel.checkpoint()
        saw = list(seen)

    async with _one_write_upstream(body) as url:
        adapter = _adapter(kind, url)
        try:
            with anyio.fail_after(10):
                for _ in range(2):  # a fresh connection, then a reused one
                    seen.clear()
                    saw = None
                    first = anyio.Event()
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(reader)
                        async for event in adapter.stream(request):
                            seen.append(event)
                            if isinstance(event, TextDelta):
                                first.set()
                    assert "".join(e.text for e in seen if isinstance(e, TextDelta)) == "abc"
                    assert isinstance(seen[-1], Finish)
                    assert saw is not None
                    assert any(isinstance(e, TextDelta) for e in saw), saw
                    assert not any(isinstance(e, Finish) for e in saw), saw
        finally:
            await adapter.aclose()
