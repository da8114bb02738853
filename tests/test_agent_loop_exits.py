"""Every exit of a turn that runs tools still finalizes it.

A disconnect, the cancel route and a SIGKILL while a tool runs leave the row with
its parts (the running call marked as such), one usage row, and the thread usable.
An MCP server that does not start stops the gateway's start-up with its name; one
that crashes mid-call is restarted and its error reaches the model and the user;
one that hangs is cut at its timeout.
"""

from __future__ import annotations

import json
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from gateway.turn.tools import STOPPED_TEXT
from llm_adapters.base import assistant_steps
from tests.fixtures_server import ServerProcess, run_gateway
from tests.sse_client import stream_request, validate_ui_stream
from tests.waiting import eventually

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
TEST_SERVER: dict[str, Any] = {"command": sys.executable, "args": ["-m", "tests.mcp_servers"],
                               "cwd": str(ROOT)}
HANG = "scripted:call=t__hang"


def mcp_env(servers: dict[str, Any], **extra: str) -> dict[str, str]:
    return {"TURNGATE_MCP_CONFIG": json.dumps({"mcpServers": servers}), **extra}


async def rows(client: httpx.AsyncClient, thread: str) -> list[dict[str, Any]]:
    r = await client.get(f"/v1/threads/{thread}/messages")
    assert r.status_code == 200, r.text
    return list(r.json()["messages"])


async def usage(client: httpx.AsyncClient, thread: str) -> list[dict[str, Any]]:
    r = await client.get("/v1/usage", params={"thread_id": thread})
    assert r.status_code == 200, r.text
    return list(r.json()["usage"])


async def final_row(client: httpx.AsyncClient, thread: str, status: str) -> dict[str, Any]:
    found = await eventually(lambda: rows(client, thread),
                             lambda ms: ms[-1]["status"] == status, within=10,
                             what=f"the reply {status}")
    return found[-1]


async def thread_still_usable(client: httpx.AsyncClient, thread: str) -> None:
    nxt = await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                               json={"turn_id": uuid.uuid4().hex, "text": "again",
                                     "model": "scripted:tokens=2"})
    validate_ui_stream(nxt)
    assert nxt.text == "w1 w2 "


def stopped_call(row: dict[str, Any]) -> dict[str, Any]:
    [call] = [p for p in row["content"] if p["type"] == "tool-call"]
    assert call["toolName"] == "t__hang" and call["errorText"] == STOPPED_TEXT
    assert "state" not in call
    return dict(call)


async def test_disconnect_during_a_tool_call(database_url: str) -> None:
    env = mcp_env({"t": {**TEST_SERVER, "timeoutSeconds": 60}}, TURNGATE_ON_DISCONNECT="cancel")
    async with run_gateway(database_url, **env) as gw, gw.client() as client:
        thread = await gw.new_thread(client)
        # The client leaves once it has seen the call (the tool is running then).
        stream = await stream_request(
            client, "POST", f"/v1/threads/{thread}/turns",
            json={"turn_id": "t1", "text": "go", "model": HANG},
            limit=5)
        assert stream.chunks[-1]["type"] == "tool-input-available", stream.chunks
        row = await final_row(client, thread, "cancelled")
        stopped_call(row)
        [used] = await usage(client, thread)
        assert used["total_tokens"] > 0
        await thread_still_usable(client, thread)


async def test_cancel_route_during_a_tool_call(database_url: str) -> None:
    env = mcp_env({"t": {**TEST_SERVER, "timeoutSeconds": 60}})
    async with run_gateway(database_url, **env) as gw, gw.client() as client:
        thread = await gw.new_thread(client)
        streams: list[Any] = []

        async def read() -> None:
            streams.append(await stream_request(
                client, "POST", f"/v1/threads/{thread}/turns",
                json={"turn_id": "t1", "text": "go", "model": HANG}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            live = await eventually(
                lambda: _now(gw.ctx.relay.get(thread, "t1")),
                lambda lv: lv is not None and lv.content is not None
                and bool(lv.content.running()), within=10, what="the tool running")
            assert live is not None
            r = await client.post(f"/v1/threads/{thread}/turns/t1/cancel")
            assert r.status_code == 200, r.text
        [stream] = streams
        validate_ui_stream(stream)
        [error] = stream.of_type("tool-output-error")
        assert error["errorText"] == STOPPED_TEXT
        assert stream.of_type("abort")
        row = await final_row(client, thread, "cancelled")
        stopped_call(row)
        assert len(await usage(client, thread)) == 1
        await thread_still_usable(client, thread)


async def _now(value: Any) -> Any:
    return value


async def test_sigkill_during_a_tool_call(database_url: str) -> None:
    server = ServerProcess(
        database_url, TURNGATE_CHECKPOINT_SECONDS="0.3", TURNGATE_LEASE_SECONDS="1.5",
        **mcp_env({"t": {**TEST_SERVER, "timeoutSeconds": 60}}),
    )
    key = (await server.cli("keys", "create", "crashy")).splitlines()[-1]
    headers = {"authorization": f"Bearer {key}"}
    try:
        await server.start()
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=10) as client:
            thread = (await client.post("/v1/threads", json={})).json()["id"]

            async def reader() -> None:
                try:
                    await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                         json={"turn_id": "doomed", "text": "x", "model": HANG})
                except httpx.TransportError:
                    pass  # the server died under it

            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                # Killed once a checkpoint holds the running call.
                await eventually(
                    lambda: rows(client, thread),
                    lambda ms: bool(ms) and any(p.get("state") == "running"
                                                for p in ms[-1]["content"]),
                    within=10, what="a checkpoint with the running call")
                server.kill(signal.SIGKILL)
            assert await server.wait(5) is not None

            await server.start()
            row = await final_row(client, thread, "interrupted")
            [call] = row["content"]
            assert call["toolName"] == "t__hang" and call["state"] == "running"
            assert len(await usage(client, thread)) == 1
            await thread_still_usable(client, thread)
    finally:
        await server.stop()


async def test_a_server_that_does_not_start_stops_startup(database_url: str) -> None:
    server = ServerProcess(database_url, **mcp_env({
        "good": TEST_SERVER, "broken": {"command": "/nonexistent/mcp-server-x"}}))
    with pytest.raises(RuntimeError, match="turngate serve exited"):
        await server.start()
    try:
        with anyio.fail_after(60):
            result = await anyio.run_process(
                [server.bin, "serve", "--port", str(server.port)], env=server.env, check=False)
        stderr = result.stderr.decode()
        assert result.returncode != 0
        assert "MCP server 'broken' did not start: command not found" in stderr
        assert "Traceback" not in stderr
    finally:
        await server.stop()


async def test_a_server_that_crashes_mid_call_is_restarted(database_url: str) -> None:
    async with run_gateway(database_url, **mcp_env({"t": TEST_SERVER})) as gw, \
            gw.client() as client:
        hub = gw.ctx.runner.tools
        assert hub is not None and hub.starts("t") == 1
        thread = await gw.new_thread(client)
        stream = await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                      json={"turn_id": "t1", "text": "go",
                                            "model": "scripted:call=t__crash"})
        validate_ui_stream(stream)
        [error] = stream.of_type("tool-output-error")
        assert error["errorText"] == ("MCP server 't' stopped during the call of 't__crash'; "
                                      "it is being restarted")
        assert stream.text == f"t__crash answered: Error: {error['errorText']}"
        row = (await rows(client, thread))[-1]
        assert row["status"] == "complete"
        assert row["content"][0]["errorText"] == error["errorText"]
        assert len(await usage(client, thread)) == 1
        # The server is back: the next turn's call runs.
        stream = await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                      json={"turn_id": "t2", "text": "go",
                                            "model": "scripted:call=t__echo,arg.text=back"})
        [output] = stream.of_type("tool-output-available")
        assert output["output"] == {"result": "back"}
        assert hub.starts("t") == 2


async def test_a_server_that_hangs_is_cut_at_its_timeout(database_url: str) -> None:
    env = mcp_env({"t": {**TEST_SERVER, "timeoutSeconds": 0.5}})
    async with run_gateway(database_url, **env) as gw, gw.client() as client:
        thread = await gw.new_thread(client)
        stream = await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                      json={"turn_id": "t1", "text": "go", "model": HANG})
        validate_ui_stream(stream)
        [error] = stream.of_type("tool-output-error")
        assert error["errorText"] == "tool 't__hang' did not answer within 0.5 s"
        row = (await rows(client, thread))[-1]
        assert row["status"] == "complete"
        assert row["content"][0]["errorText"] == error["errorText"]
        assert row["content"][1]["text"] == f"t__hang answered: Error: {error['errorText']}"
        [used] = await usage(client, thread)
        assert len(used["call_details"]) == 2


async def test_sigterm_during_a_tool_call(database_url: str) -> None:
    server = ServerProcess(
        database_url, TURNGATE_SHUTDOWN_GRACE_SECONDS="0.5", TURNGATE_CHECKPOINT_SECONDS="0.2",
        **mcp_env({"t": {**TEST_SERVER, "timeoutSeconds": 60}}),
    )
    key = (await server.cli("keys", "create", "termy")).splitlines()[-1]
    headers = {"authorization": f"Bearer {key}"}
    try:
        await server.start()
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=20) as client:
            thread = (await client.post("/v1/threads", json={})).json()["id"]
            streams: list[Any] = []

            async def reader() -> None:
                streams.append(await stream_request(
                    client, "POST", f"/v1/threads/{thread}/turns",
                    json={"turn_id": "t1", "text": "x", "model": HANG}))

            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                await eventually(
                    lambda: rows(client, thread),
                    lambda ms: len(ms) == 2 and any(p.get("state") == "running"
                                                    for p in ms[-1]["content"]),
                    within=10, what="a checkpoint with the running call")
                server.kill(signal.SIGTERM)
            assert await server.wait(15) is not None
            [stream] = streams
            validate_ui_stream(stream)
            assert stream.of_type("tool-output-error")[0]["errorText"] == STOPPED_TEXT
            await server.start()
            row = (await rows(client, thread))[-1]
            assert row["status"] == "interrupted"
            stopped_call(row)
            assert len(await usage(client, thread)) == 1
            await thread_still_usable(client, thread)
    finally:
        await server.stop()


async def test_disconnect_after_an_output_keeps_it_as_the_gateways(database_url: str) -> None:
    """Stored as it was delivered (a reader that left, ``cancel``): a tool output the
    gateway streamed stays a gateway call, sent back to the model in the next turn."""
    env = mcp_env({"t": TEST_SERVER}, TURNGATE_ON_DISCONNECT="cancel")
    async with run_gateway(database_url, **env) as gw, gw.client() as client:
        thread = await gw.new_thread(client)
        model = "scripted:call=t__echo,arg.text=hi,delay_ms=200"
        stream = await stream_request(
            client, "POST", f"/v1/threads/{thread}/turns",
            json={"turn_id": "t1", "text": "go", "model": model}, limit=8)
        assert [c["type"] for c in stream.chunks][-3:] == [
            "tool-output-available", "finish-step", "start-step"]
        row = await final_row(client, thread, "cancelled")
        [call] = row["content"]
        assert call["result"] == {"result": "hi"} and "providerExecuted" not in call
        assert assistant_steps(row["content"]) == [("", [call])]  # sent back to the model
