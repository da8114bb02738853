"""A call that never reached the provider costs nothing and is not estimated.

Connection refused, a name that does not resolve, or no API key: the turn ends in
an error, and its one ``token_usage`` row says 0 tokens, cost 0, ``estimated:
false`` (it used to book ~27 estimated prompt tokens and a cost). A missing key is
named in the error the user sees. A stream cut mid-way still gets an estimate:
that call did reach the provider. End to end over HTTP, on both databases.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream

from tests.fixtures_server import free_port, run_gateway
from tests.sse_client import Stream, stream_request, validate_ui_stream

pytestmark = pytest.mark.anyio

KEY = "sk-unsent-0123456789abcdefSECRET"
PRICES = json.dumps({"gpt-4o": {"input": 2.5, "output": 10},
                     "claude-sonnet-4": {"input": 3, "output": 15}})
PROMPT = "Hello there, model, please write me a long answer about many things."


async def _turn(database_url: str, model: str, **env: str) -> tuple[Stream, dict[str, Any]]:
    """One turn over real HTTP; its stream and its stored usage row."""
    async with run_gateway(database_url, TURNGATE_PRICES=PRICES, **env) as gw, \
            gw.client() as client:
        for name in ("openai", "anthropic"):
            gw.ctx.adapters.get(name).retry_delay = 0.01  # type: ignore[attr-defined]
        thread = await gw.new_thread(client)
        body = {"turn_id": uuid.uuid4().hex, "text": PROMPT, "model": model}
        s = await stream_request(client, "POST", f"/v1/threads/{thread}/turns", json=body)
        assert s.status == 200, s
        validate_ui_stream(s)
        # The final chunks go out after the finalize write: the row is there now.
        r = await client.get("/v1/usage", params={"thread_id": thread})
        assert r.status_code == 200, r.text
        rows = r.json()["usage"]
        assert len(rows) == 1, f"expected exactly one usage row, got {rows}"
        return s, rows[0]


def _assert_zero_not_estimated(s: Stream, row: dict[str, Any]) -> None:
    (meta,) = [c for c in s.of_type("message-metadata")]
    usage = meta["messageMetadata"]["usage"]
    expected = {"inputTokens": 0, "outputTokens": 0, "totalTokens": 0, "costMicros": 0,
                "estimated": False}
    assert {k: usage.get(k) for k in expected} == expected, (
        f"stream usage {usage}, expected {expected} for a call that never reached the provider"
    )
    stored = {k: row[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens",
                                  "cost_micros", "estimated")}
    assert stored == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                      "cost_micros": 0, "estimated": False}, f"stored usage {stored}"
    assert all(c["estimated"] is False for c in row["call_details"]), row["call_details"]


def _error_text(s: Stream) -> str:
    errors = [c["errorText"] for c in s.of_type("error")]
    assert len(errors) == 1, f"expected one error chunk, got {errors}"
    return str(errors[0])


@pytest.mark.parametrize("model", ["openai:gpt-4o", "anthropic:claude-sonnet-4"])
async def test_connection_refused_costs_nothing(database_url: str, model: str) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    s, row = await _turn(database_url, model, OPENAI_BASE_URL=closed + "/v1",
                         OPENAI_API_KEY=KEY, ANTHROPIC_BASE_URL=closed, ANTHROPIC_API_KEY=KEY)
    assert _error_text(s) == "The model provider could not be reached."
    _assert_zero_not_estimated(s, row)


async def test_unresolvable_host_costs_nothing(database_url: str) -> None:
    s, row = await _turn(database_url, "openai:gpt-4o",
                         OPENAI_BASE_URL="http://turngate-no-such-host.invalid/v1",
                         OPENAI_API_KEY=KEY)
    assert _error_text(s) == "The model provider could not be reached."
    _assert_zero_not_estimated(s, row)


@pytest.mark.parametrize(
    ("model", "variable"),
    [("openai:gpt-4o", "OPENAI_API_KEY"), ("anthropic:claude-sonnet-4", "ANTHROPIC_API_KEY")],
)
async def test_missing_key_is_named_and_costs_nothing(
    database_url: str, model: str, variable: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The provider's own endpoint (the default base URL) with no key: nothing is sent
    # (the test machine could not reach it anyway), and the error says what is missing.
    caplog.set_level(logging.WARNING, logger="turngate.turns")
    s, row = await _turn(database_url, model, OPENAI_API_KEY="", ANTHROPIC_API_KEY="")
    text = _error_text(s)
    assert f"{variable} is not set" in text, f"error text {text!r} does not name {variable}"
    _assert_zero_not_estimated(s, row)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("upstream_error")]
    assert len(logged) == 1 and f"{variable} is not set" in logged[0], logged


@asynccontextmanager
async def _cut_stream_upstream() -> AsyncIterator[str]:
    """An OpenAI-compatible endpoint that answers 200, streams one delta, and hangs up."""

    async def handle(client: SocketStream) -> None:
        async with client:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await client.receive()
            head, _, rest = request.partition(b"\r\n\r\n")
            length = int([line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")][0])
            while len(rest) < length:
                rest += await client.receive()
            chunk = {"choices": [{"index": 0, "delta": {"content": "Partial reply"}}]}
            await client.send(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            data = f"data: {json.dumps(chunk)}\n\n".encode()
            await client.send(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            # No terminating chunk: the connection just ends mid-stream.

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            tg.cancel_scope.cancel()


async def test_stream_cut_after_reaching_the_provider_is_still_estimated(
    database_url: str,
) -> None:
    async with _cut_stream_upstream() as base:
        s, row = await _turn(database_url, "openai:gpt-4o", OPENAI_BASE_URL=base,
                             OPENAI_API_KEY=KEY)
    assert s.text == "Partial reply"
    assert _error_text(s) == "The model provider's stream failed."
    assert row["estimated"] is True, f"a cut stream must be estimated: {row}"
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0, row


async def test_key_is_never_shown(database_url: str) -> None:
    closed = f"http://127.0.0.1:{free_port()}/v1"
    s, row = await _turn(database_url, "openai:gpt-4o", OPENAI_BASE_URL=closed,
                         OPENAI_API_KEY=KEY)
    assert KEY not in json.dumps([e.data for e in s.events]) + json.dumps(row)

