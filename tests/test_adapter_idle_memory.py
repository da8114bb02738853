"""What an idle upstream stream keeps (llm_adapters/_http.py, llm_adapters/openai.py):
aiohttp's answer only, not httpx's request and response around it, no copy of the
request body, and nothing of the last read (its events, their parsed chunks)."""

from __future__ import annotations

import gc
import tracemalloc

import anyio
import anyio.lowlevel
import httpx
import pytest

from llm_adapters._http import _exact, dumps
from llm_adapters.base import AdapterRequest, ChatMessage
from llm_adapters.events import TextDelta
from llm_adapters.openai import OpenAIAdapter
from tests.upstream_fakes import FakeResponse, FakeUpstream

pytestmark = pytest.mark.anyio

ONE_TOKEN = b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'


def _traced(make: object) -> int:
    """Bytes that ``make()``'s result holds, as tracemalloc counts them."""
    assert callable(make)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = make()
        size = tracemalloc.get_traced_memory()[0] - before
        del kept
        return size
    finally:
        tracemalloc.stop()


def test_the_sent_body_is_kept_in_a_buffer_of_its_own_size() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}
    size = len(dumps(body))
    assert _exact(dumps(body)) == dumps(body)
    # orjson's result keeps the buffer it grew in: about 4 KiB for 70 bytes.
    assert _traced(lambda: dumps(body)) >= 4000
    assert _traced(lambda: _exact(dumps(body))) <= size + 64


async def test_an_idle_stream_keeps_neither_httpx_objects_nor_its_request_body() -> None:
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.sse(ONE_TOKEN, hold_open=True))
        adapter = OpenAIAdapter({"OPENAI_BASE_URL": fake.url + "/v1", "OPENAI_API_KEY": "k"})
        history = [ChatMessage("user", [{"type": "text", "text": "hello " * 1000}])]
        stream = adapter.stream(AdapterRequest("gpt-4o", history))
        try:
            with anyio.fail_after(5):
                event = await stream.__anext__()
            assert event == TextDelta("Hi")
            async with anyio.create_task_group() as tg:
                # Asked for its next event (as the gateway does at once), the stream
                # waits for the next read: that is how an idle stream sits.
                tg.start_soon(stream.__anext__)
                upstream = stream.ag_frame.f_locals["events"] if stream.ag_frame else None
                with anyio.fail_after(5):
                    while upstream is None or upstream.ag_await is None:
                        await anyio.lowlevel.checkpoint()
                gc.collect()
                alive = [o for o in gc.get_objects()
                         if isinstance(o, httpx.Request | httpx.Response)]
                assert alive == []
                assert stream.ag_frame is not None
                outer = stream.ag_frame.f_locals
                assert "body" not in outer
                # Nor the last read's events, nor their parsed chunks (``_Reply.feed``'s).
                assert "batch" not in outer and "chunk" not in outer
                local = upstream.ag_frame.f_locals
                assert "body" not in local and local["payload"] is None
                assert "events" not in local and "event" not in local
                tg.cancel_scope.cancel()
        finally:
            await stream.aclose()
            await adapter.aclose()
