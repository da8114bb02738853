"""Every frame the gateway writes is the SSE event sse-starlette would write for it.

The turn stream is encoded by the project itself (gateway/turn/chunks.py) and sent by
its own response (gateway/streaming/sse.py), not by sse-starlette (docs/DECISIONS.md).
This checks the encoding against sse-starlette's: each frame, and the whole stream,
parsed by one independent SSE parser (httpx-sse), gives the same events (id, event,
data, retry) as sse-starlette's ``ServerSentEvent(...).encode()`` of what the frame
should carry. The expected chunks are written out here, not taken from the encoder.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from httpx_sse import EventSource
from hypothesis import given, settings
from hypothesis import strategies as st
from sse_starlette import ServerSentEvent

from gateway.replicas.follow import RESUME_CHUNK
from gateway.streaming.sse import PING_MESSAGE
from gateway.turn.chunks import ChunkEncoder
from llm_adapters.events import (
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    ToolResult,
)

# Text that a careless SSE encoder breaks: line breaks of every kind (U+2028 is not
# one in SSE, but is in str.splitlines), a blank line, something that looks like a
# field, quotes, backslashes, non-ASCII.
TRICKY = 'a\nb\r\nc\rd\u2028e\n\nid: 99\ndata: [DONE]\n\n"q" \\ é 日本 🙂'
USAGE = {"inputTokens": 3, "outputTokens": 4, "totalTokens": 7}

# One turn: reasoning, a tool call in two fragments and its result, two text deltas.
EVENTS = [
    ReasoningDelta("think\nfirst"),
    ToolCallStart("call_1", "lookup"),
    ToolCallDelta("call_1", '{"q":'),
    ToolCallDelta("call_1", '"x\\ny"}'),
    ToolCallEnd("call_1"),
    ToolResult("call_1", {"answer": TRICKY}),
    TextDelta(TRICKY),
    TextDelta("data: more"),
    Finish("stop"),
]
OPENING = [
    {"type": "start", "messageId": "42", "messageMetadata": {"model": "scripted"}},
    {"type": "start-step"},
    {"type": "reasoning-start", "id": "r1"},
    {"type": "reasoning-delta", "id": "r1", "delta": "think\nfirst"},
    {"type": "reasoning-end", "id": "r1"},
    {"type": "tool-input-start", "toolCallId": "call_1", "toolName": "lookup"},
    {"type": "tool-input-delta", "toolCallId": "call_1", "inputTextDelta": '{"q":'},
    {"type": "tool-input-delta", "toolCallId": "call_1", "inputTextDelta": '"x\\ny"}'},
    {"type": "tool-input-available", "toolCallId": "call_1", "toolName": "lookup",
     "input": {"q": "x\ny"}},
    {"type": "tool-output-available", "toolCallId": "call_1", "output": {"answer": TRICKY}},
    {"type": "text-start", "id": "t2"},
    {"type": "text-delta", "id": "t2", "delta": TRICKY},
    {"type": "text-delta", "id": "t2", "delta": "data: more"},
    {"type": "text-end", "id": "t2"},
    {"type": "finish-step"},
]
ENDINGS: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {
    "complete": ({"finish_reason": "stop"}, []),
    "error": (
        {"finish_reason": "error", "error_text": "The reply failed:\nupstream"},
        [{"type": "error", "errorText": "The reply failed:\nupstream"}],
    ),
    "cancelled": (
        {"finish_reason": "other", "aborted": True},
        [{"type": "abort", "reason": "cancelled"}],
    ),
}

Parsed = tuple[str, str | None, Any, int | None]  # event, id, data (JSON decoded), retry


def parse(stream: bytes) -> list[Parsed]:
    """The events of ``stream`` as httpx-sse reads them."""
    response = httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content=stream
    )
    out: list[Parsed] = []
    for sse in EventSource(response).iter_sse():
        if sse.data == "":
            # The spec dispatches no event for an empty data buffer; httpx-sse does once
            # it has seen an id (a comment's blank line then "dispatches" one).
            continue
        data = sse.data if sse.data == "[DONE]" else json.loads(sse.data)
        out.append((sse.event, sse.id, data, sse.retry))
    return out


def reference(data: Any, seq: int | None) -> bytes:
    """sse-starlette's encoding of one event carrying ``data`` with id ``seq``."""
    text = data if isinstance(data, str) else json.dumps(data)
    return ServerSentEvent(text, id=None if seq is None else str(seq)).encode()


def assert_same_events(frames: list[bytes], expected: list[bytes]) -> None:
    """Frame by frame, then as one stream: the same events as the reference."""
    assert len(frames) == len(expected)
    for n, (frame, ref) in enumerate(zip(frames, expected, strict=True)):
        assert parse(frame) == parse(ref), f"frame {n}: {frame!r}"
        assert len(parse(frame)) <= 1, f"frame {n} holds more than one event: {frame!r}"
    assert parse(b"".join(frames)) == parse(b"".join(expected))


def _turn(ending: str) -> tuple[list[bytes], list[bytes]]:
    """A whole turn's frames from ``ChunkEncoder``, and sse-starlette's encoding of it."""
    end_args, end_chunks = ENDINGS[ending]
    encoder = ChunkEncoder()
    frames = encoder.start(42, {"model": "scripted"})
    for event in EVENTS:
        frames += encoder.feed(event)
    frames += encoder.end(
        end_args["finish_reason"], USAGE,
        error_text=end_args.get("error_text"), aborted=end_args.get("aborted", False),
    )
    chunks = [
        *OPENING, *end_chunks,
        {"type": "message-metadata", "messageMetadata": {"usage": USAGE}},
        {"type": "finish", "finishReason": end_args["finish_reason"],
         "messageMetadata": {"usage": USAGE}},
    ]
    expected = [reference(chunk, seq) for seq, chunk in enumerate(chunks)]
    expected.append(reference("[DONE]", len(chunks)))
    return frames, expected


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_a_turns_frames_are_the_events_sse_starlette_writes(ending: str) -> None:
    frames, expected = _turn(ending)
    assert_same_events(frames, expected)
    # Every event of a turn has an id (resume), and nothing but the last is [DONE].
    events = parse(b"".join(frames))
    assert [e[1] for e in events] == [str(n) for n in range(len(events))]
    assert events[-1][2] == "[DONE]" and all(e[2] != "[DONE]" for e in events[:-1])
    assert all(e[0] == "message" and e[3] is None for e in events)  # no event:, no retry:


def test_the_ping_is_a_comment_and_nothing_else() -> None:
    ping = PING_MESSAGE["body"]
    assert parse(ping) == parse(ServerSentEvent(comment="ping").encode()) == []
    # Only comment lines, ended by a blank line, so it can sit between any two events.
    lines = ping.split(b"\n")
    assert lines[-2:] == [b"", b""] and all(line.startswith(b":") for line in lines[:-2])
    frames, expected = _turn("complete")
    pinged = [frames[0], ping, *frames[1:], ping]
    ref = [expected[0], ServerSentEvent(comment="ping").encode(), *expected[1:],
           ServerSentEvent(comment="ping").encode()]
    assert parse(b"".join(pinged)) == parse(b"".join(ref)) == parse(b"".join(expected))


def test_the_relay_lost_chunk_is_an_error_event_without_an_id() -> None:
    frames, expected = _turn("complete")
    chunk = {"type": "error", "errorText": "The stream of this reply was interrupted "
             "(relay_lost). Resume it with Last-Event-ID to get the rest."}
    assert_same_events([RESUME_CHUNK], [reference(chunk, None)])
    # After some events: the client's Last-Event-ID stays that of the last real event.
    sent = [*frames[:5], RESUME_CHUNK]
    assert parse(b"".join(sent)) == parse(b"".join([*expected[:5], reference(chunk, None)]))
    assert parse(b"".join(sent))[-1][1] == "4"


@pytest.mark.parametrize(
    "broken",
    [
        b"id: 3\ndata: {\"type\":\"start-step\"}\n",  # no blank line: the event never ends
        b"id: 3\ndata: {\"type\":\"text-delta\",\"id\":\"t1\",\"delta\":\"a\nb\"}\n\n",
        b"id:3\ndata: {\"type\":\"start-step\"}\n\n\n",  # fine, but id 3 is not the one due
        b"id: 1\nevent: chunk\ndata: {\"type\":\"start-step\"}\n\n",
        b"id: 1\nretry: 1000\ndata: {\"type\":\"start-step\"}\n\n",
        b"id: 1\ndata: {\"type\":\"start-step\"}\n\nid: 2\ndata: {}\n\n",
    ],
)
def test_the_check_finds_a_malformed_frame(broken: bytes) -> None:
    """What the comparison above catches: a frame that is not the event it should be."""
    expected = reference({"type": "start-step"}, 1)
    with pytest.raises((AssertionError, json.JSONDecodeError)):
        assert_same_events([broken], [expected])


@given(st.lists(st.tuples(st.sampled_from([TextDelta, ReasoningDelta]),
                          st.text(min_size=1, max_size=12)), min_size=1, max_size=12))
@settings(max_examples=300, deadline=None)
def test_delta_frames_are_compact_json_byte_for_byte(
    deltas: list[tuple[type[TextDelta] | type[ReasoningDelta], str]],
) -> None:
    """Every delta frame (the first of a part, and the per-token ones after it) is
    exactly ``id: N`` and the chunk as compact, non-ASCII-preserving JSON; the bytes,
    not only the parsed event, since a replay must write the same ones."""
    encoder = ChunkEncoder()
    expected: list[bytes] = []
    seq, part, open_kind = 0, 0, ""

    def frame(chunk: dict[str, str]) -> bytes:
        nonlocal seq
        body = json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode()
        seq += 1
        return b"id: %d\ndata: %s\n\n" % (seq - 1, body)

    frames: list[bytes] = []
    for cls, text in deltas:
        frames += encoder.feed(cls(text))
        kind = "text" if cls is TextDelta else "reasoning"
        if kind != open_kind:
            if open_kind:
                expected.append(frame({"type": f"{open_kind}-end", "id": f"{open_kind[0]}{part}"}))
            part += 1
            open_kind = kind
            expected.append(frame({"type": f"{kind}-start", "id": f"{kind[0]}{part}"}))
        expected.append(frame({"type": f"{kind}-delta", "id": f"{kind[0]}{part}",
                               "delta": text}))
    assert frames == expected
