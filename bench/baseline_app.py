"""The bare baseline: the same turn stream with no persistence, no relay, no auth.

Run the way ``turngate serve`` runs (uvicorn, uvloop, httptools, one worker):

    python bench/baseline_app.py --variant sse   --port 8101
    python bench/baseline_app.py --variant plain --port 8102

Routes mirror the gateway's so one client drives both:

- ``POST /v1/threads`` -> ``{"id": <uuid>}`` (201)
- ``POST /v1/threads/{id}/turns`` with ``{"turn_id", "text", "model":
  "scripted:tokens=N,delay_ms=D"}`` -> the AI SDK UI message stream: start,
  start-step, text-start, N text-delta, text-end, finish-step,
  message-metadata, finish, ``data: [DONE]``; every event with an ``id:``.
- ``GET /healthz``

Variants: ``sse`` is a minimal sse-starlette ``EventSourceResponse`` yielding
``ServerSentEvent`` objects (what a typical app writes); ``plain`` is
Starlette's ``StreamingResponse`` writing pre-encoded SSE bytes. Both yield to
the event loop between deltas, as the scripted adapter does.
"""

from __future__ import annotations

import argparse
import json
import uuid

import anyio
import anyio.lowlevel
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

HEADERS = {
    "cache-control": "no-cache",
    "connection": "keep-alive",
    "x-vercel-ai-ui-message-stream": "v1",
    "x-accel-buffering": "no",
}


def parse_model(model: str) -> tuple[int, float]:
    tokens, delay_ms = 10, 0
    _, _, opts = model.partition(":")
    for item in filter(None, (p.strip() for p in opts.split(","))):
        key, _, raw = item.partition("=")
        if key == "tokens":
            tokens = int(raw)
        elif key == "delay_ms":
            delay_ms = int(raw)
    return tokens, delay_ms / 1000


async def chunks(thread_id: str, turn_id: str, tokens: int, delay: float):
    """The turn's chunks as dicts, pausing like the scripted adapter."""
    usage = {"inputTokens": 1, "outputTokens": tokens, "totalTokens": tokens + 1,
             "costMicros": 0, "estimated": False}
    yield {"type": "start", "messageId": "1",
           "messageMetadata": {"threadId": thread_id, "turnId": turn_id, "userMessageId": "0"}}
    yield {"type": "start-step"}
    for i in range(1, tokens + 1):
        if delay:
            await anyio.sleep(delay)
        else:
            await anyio.lowlevel.checkpoint()
        if i == 1:
            yield {"type": "text-start", "id": "t1"}
        yield {"type": "text-delta", "id": "t1", "delta": f"w{i} "}
    await anyio.lowlevel.checkpoint()
    if tokens:
        yield {"type": "text-end", "id": "t1"}
    yield {"type": "finish-step"}
    yield {"type": "message-metadata", "messageMetadata": {"usage": usage}}
    yield {"type": "finish", "finishReason": "stop", "messageMetadata": {"usage": usage}}


async def create_thread(request: Request) -> Response:
    return JSONResponse({"id": str(uuid.uuid4())}, status_code=201)


async def healthz(request: Request) -> Response:
    return JSONResponse({"ok": True})


def make_app(variant: str) -> Starlette:
    async def start_turn(request: Request) -> Response:
        body = await request.json()
        thread_id = request.path_params["thread_id"]
        tokens, delay = parse_model(body.get("model", "scripted:tokens=10"))
        source = chunks(thread_id, body["turn_id"], tokens, delay)
        if variant == "sse":
            async def events():
                seq = 0
                async for chunk in source:
                    yield ServerSentEvent(data=_dumps(chunk), id=str(seq), sep="\n")
                    seq += 1
                yield ServerSentEvent(data="[DONE]", id=str(seq), sep="\n")

            return EventSourceResponse(events(), headers=HEADERS, sep="\n")

        async def raw():
            seq = 0
            async for chunk in source:
                yield b"id: %d\ndata: %s\n\n" % (seq, _dumps(chunk).encode())
                seq += 1
            yield b"id: %d\ndata: [DONE]\n\n" % seq

        return StreamingResponse(raw(), media_type="text/event-stream", headers=HEADERS)

    return Starlette(routes=[
        Route("/healthz", healthz, methods=["GET"]),
        Route("/v1/threads", create_thread, methods=["POST"]),
        Route("/v1/threads/{thread_id}/turns", start_turn, methods=["POST"]),
    ])


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=("sse", "plain"), default="sse")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8101)
    args = parser.parse_args()
    uvicorn.run(make_app(args.variant), host=args.host, port=args.port, loop="uvloop",
                http="httptools", log_config=None, lifespan="on")


if __name__ == "__main__":
    main()
