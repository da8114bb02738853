"""A fake LLM provider for the benchmarks: OpenAI Chat Completions and Anthropic Messages
streams of pre-encoded chunks, as fast as a socket takes them or paced.

    python bench/fake_llm_upstream.py --port 8201

- ``POST /v1/chat/completions`` (also ``/chat/completions``): an OpenAI-compatible
  stream: a role chunk, N content chunks of the text ``Zq``, a finish chunk, a usage
  chunk, ``data: [DONE]``.
- ``POST /v1/messages``: the same as an Anthropic Messages stream (``message_start``,
  a text block with N ``text_delta`` s, ``message_delta``, ``message_stop``).
- ``GET /healthz``, ``GET /v1/models``.

The request's ``model`` says what to stream: ``fake-t<N>-d<MS>`` is N tokens
<MS> ms apart (0: all written at once); ``fake-t<N>-hold`` writes the first token,
then holds the stream open, idle, for 10 minutes (or until the client leaves) before
it finishes. Every frame is encoded once at start; a response is HTTP/1.1 chunked
and the connection is kept alive, as a real provider's is.

Each answer takes one asyncio task; the HTTP request head is parsed by httptools
(the parser uvicorn uses), so the fake costs little of the machine's two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from typing import Any

import httptools

TOKEN = "Zq"
HOLD_SECONDS = 600.0
_MODEL = re.compile(r"t(\d+)-(?:d(\d+)|(hold))")


def _chunk(frame: bytes) -> bytes:
    """``frame`` as one HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(frame), frame)


def _data(obj: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return _chunk(f"{head}data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode())


def _openai_frames(model: str) -> tuple[bytes, bytes, bytes]:
    """(head frames, one token frame, tail frames) of an OpenAI stream."""
    base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1,
            "model": model}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    head = _data(chunk({"role": "assistant", "content": ""}))
    token = _data(chunk({"content": TOKEN}))
    tail = (_data(chunk({}, "stop"))
            + _data({**base, "choices": [], "usage": {"prompt_tokens": 5,
                                                       "completion_tokens": 1,
                                                       "total_tokens": 6}})
            + _chunk(b"data: [DONE]\n\n"))
    return head, token, tail


def _anthropic_frames(model: str) -> tuple[bytes, bytes, bytes]:
    """(head frames, one token frame, tail frames) of an Anthropic stream."""
    head = (_data({"type": "message_start", "message": {
                "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": 5, "output_tokens": 1}}}, "message_start")
            + _data({"type": "content_block_start", "index": 0,
                     "content_block": {"type": "text", "text": ""}}, "content_block_start"))
    token = _data({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "text_delta", "text": TOKEN}}, "content_block_delta")
    tail = (_data({"type": "content_block_stop", "index": 0}, "content_block_stop")
            + _data({"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                       "stop_sequence": None},
                     "usage": {"output_tokens": 1}}, "message_delta")
            + _data({"type": "message_stop"}, "message_stop"))
    return head, token, tail


_STREAM_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")
_END = b"0\r\n\r\n"


def _plain(status: int, body: bytes) -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}.get(status, b"X")
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (status, reason, len(body), body))


class _Connection(asyncio.Protocol):
    def __init__(self, frames: dict[tuple[str, str], tuple[bytes, bytes, bytes]]) -> None:
        self.frames = frames
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.writable = asyncio.Event()
        self.writable.set()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None:
            self.task.cancel()
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        url, body = self.url.split(b"?")[0], bytes(self.body)
        method = self.parser.get_method()
        keep = self.parser.should_keep_alive()
        self.url, self.body = b"", bytearray()
        self.task = asyncio.ensure_future(self.answer(method, url, body, keep))

    async def answer(self, method: bytes, url: bytes, body: bytes, keep: bool) -> None:
        transport = self.transport
        assert transport is not None
        if method == b"GET":
            if url in (b"/healthz", b"/v1/models", b"/models"):
                transport.write(_plain(200, b'{"object":"list","data":[{"id":"fake-t3-d0"}]}'))
            else:
                transport.write(_plain(404, b'{"error":{"message":"no such route"}}'))
        else:
            kind = ("anthropic" if url.endswith(b"/messages") else
                    "openai" if url.endswith(b"/chat/completions") else "")
            try:
                model = str(json.loads(body)["model"])
                spec = _MODEL.search(model)
            except (ValueError, KeyError, TypeError):
                spec = None
            if not kind or spec is None:
                transport.write(_plain(400, b'{"error":{"message":"model must be fake-tN-dMS"}}'))
            else:
                await self.stream(transport, kind, model, int(spec.group(1)),
                                  int(spec.group(2) or 0), bool(spec.group(3)))
        if not keep:
            transport.close()

    async def stream(self, transport: asyncio.Transport, kind: str, model: str, tokens: int,
                     delay_ms: int, hold: bool) -> None:
        frames = self.frames.get((kind, model))
        if frames is None:
            frames = self.frames[(kind, model)] = (
                _anthropic_frames(model) if kind == "anthropic" else _openai_frames(model))
        head, token, tail = frames
        if hold:
            transport.write(_STREAM_HEAD + head + token)
            await asyncio.sleep(HOLD_SECONDS)
            transport.write(tail + _END)
            return
        if delay_ms == 0:
            transport.write(_STREAM_HEAD + head)
            left = tokens
            while left:
                n = min(left, 512)
                transport.write(token * n)
                left -= n
                await self.writable.wait()
            transport.write(tail + _END)
            return
        transport.write(_STREAM_HEAD + head + token)
        start, step = time.monotonic(), delay_ms / 1000
        for i in range(1, tokens):
            wait = start + i * step - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            transport.write(token)
        transport.write(tail + _END)


async def serve(host: str, port: int) -> None:
    """Serve until cancelled."""
    frames: dict[tuple[str, str], tuple[bytes, bytes, bytes]] = {}
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(frames), host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8201)
    args = ap.parse_args()
    try:
        import uvloop
        uvloop.run(serve(args.host, args.port))
    except ImportError:
        asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
