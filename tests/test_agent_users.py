"""A server's ``"users"``: only the listed users' turns are offered its tools.

Two users, ``alice`` (listed) and ``bob`` (not), on a real gateway over real HTTP,
both databases, with the test MCP server over stdio (its ``touch`` tool creates a
file, so a call that ran leaves a trace). The fake OpenAI upstream shows what each
user's model is offered; a call bob's model makes anyway is answered with a tool
error and nothing runs, in the turn, in an approval continuation (the config
changed while the turn waited) and in the history of later turns.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from gateway.tools.config import McpConfig, ServerConfig
from gateway.tools.servers import ToolHub
from gateway.turn.tools import toolbox_for, withheld_text
from persistence import Store
from tests.fixtures_server import GatewayServer, run_gateway
from tests.sse_client import Stream, stream_request, validate_ui_stream
from tests.test_agent_loop import openai_text, openai_tool_call
from tests.upstream_fakes import FakeResponse, FakeUpstream

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
SERVER: dict[str, Any] = {"command": sys.executable, "args": ["-m", "tests.mcp_servers"],
                          "cwd": str(ROOT)}
OPEN_TOOLS = ["open__add", "open__crash", "open__echo", "open__environ", "open__fail",
              "open__hang", "open__look_up", "open__note", "open__pid", "open__touch"]
TEAM_TOOLS = [name.replace("open__", "team__") for name in OPEN_TOOLS]


def env(servers: dict[str, Any], **extra: str) -> dict[str, str]:
    return {"TURNGATE_MCP_CONFIG": json.dumps({"mcpServers": servers}), **extra}


async def turn(client: httpx.AsyncClient, thread: str, model: str,
               text: str = "touch it") -> Stream:
    stream = await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                  json={"turn_id": uuid.uuid4().hex, "text": text,
                                        "model": model})
    validate_ui_stream(stream)
    return stream


async def last_reply(client: httpx.AsyncClient, thread: str) -> dict[str, Any]:
    r = await client.get(f"/v1/threads/{thread}/messages")
    assert r.status_code == 200, r.text
    return dict([m for m in r.json()["messages"] if m["role"] == "assistant"][-1])


def offered(request_json: dict[str, Any]) -> list[str]:
    return sorted(t["function"]["name"] for t in request_json.get("tools", []))


def scripted_touch(tool: str, path: Path) -> str:
    return f"scripted:call={tool},arg.path={quote(str(path), safe='')}"


async def test_only_listed_users_are_offered_and_run_a_servers_tools(
    database_url: str, tmp_path: Path,
) -> None:
    servers = {"open": SERVER, "team": {**SERVER, "users": ["alice"]}}
    alice_file, bob_file = tmp_path / "alice", tmp_path / "bob"
    async with FakeUpstream() as fake:
        settings = env(servers, OPENAI_BASE_URL=fake.url + "/v1", OPENAI_API_KEY="k")
        async with run_gateway(database_url, **settings) as gw:
            _, bob_key = await gw.new_user("bob")
            async with gw.client() as alice, gw.client(key=bob_key) as bob:
                # alice is listed: offered every tool, and her call runs.
                fake.enqueue(FakeResponse.sse(openai_tool_call(
                    "call_a", "team__touch", {"path": str(alice_file)})))
                fake.enqueue(FakeResponse.sse(openai_text("Done.")))
                thread_a = await gw.new_thread(alice)
                stream = await turn(alice, thread_a, "openai:gpt-4o")
                assert offered(fake.requests[0].json) == sorted(OPEN_TOOLS + TEAM_TOOLS)
                [output] = stream.of_type("tool-output-available")
                assert output == {"type": "tool-output-available", "toolCallId": "call_a",
                                  "output": {"result": f"touched {alice_file}"}}
                assert alice_file.read_text() == "touched\n"

                # bob is not: the team server's tools are not offered to his model...
                fake.enqueue(FakeResponse.sse(openai_tool_call(
                    "call_b", "team__touch", {"path": str(bob_file)})))
                fake.enqueue(FakeResponse.sse(openai_text("It did not work.")))
                thread_b = await gw.new_thread(bob)
                stream = await turn(bob, thread_b, "openai:gpt-4o")
                first, second = fake.requests[2:4]
                assert offered(first.json) == OPEN_TOOLS
                # ... and the call his model makes anyway is a tool error; nothing ran.
                assert not stream.of_type("tool-output-available")
                assert not stream.of_type("tool-approval-request")
                [error] = stream.of_type("tool-output-error")
                assert error == {"type": "tool-output-error", "toolCallId": "call_b",
                                 "errorText": withheld_text("team__touch")}
                assert not bob_file.exists()
                # The model reads the error and answers; the row keeps both.
                assert offered(second.json) == OPEN_TOOLS
                assert second.json["messages"][-1] == {
                    "role": "tool", "tool_call_id": "call_b",
                    "content": "Error: " + withheld_text("team__touch")}
                row = await last_reply(bob, thread_b)
                assert row["status"] == "complete"
                call, text = row["content"]
                assert call["toolName"] == "team__touch" and "result" not in call
                assert call["errorText"] == withheld_text("team__touch")
                assert text["text"] == "It did not work."

                # A later turn: the refused call is in the history in the provider's
                # form, and the tool is still not offered.
                fake.enqueue(FakeResponse.sse(openai_text("Still no.")))
                await turn(bob, thread_b, "openai:gpt-4o", "and now?")
                later = fake.requests[4].json
                assert offered(later) == OPEN_TOOLS
                tool_messages = [m for m in later["messages"] if m["role"] == "tool"]
                assert tool_messages == [{"role": "tool", "tool_call_id": "call_b",
                                          "content": "Error: " + withheld_text("team__touch")}]
                assert len(fake.requests) == 5

                # A regenerate offers what the turn does: everything to alice, not to bob.
                for client, thread, tools in ((alice, thread_a, OPEN_TOOLS + TEAM_TOOLS),
                                              (bob, thread_b, OPEN_TOOLS)):
                    fake.enqueue(FakeResponse.sse(openai_text("Again.")))
                    turn_id = (await last_reply(client, thread))["turn_id"]
                    again = await stream_request(
                        client, "POST", f"/v1/threads/{thread}/turns/{turn_id}/regenerate",
                        json={"model": "openai:gpt-4o"})
                    assert again.text == "Again."
                    assert offered(fake.requests[-1].json) == sorted(tools)
                assert len(fake.requests) == 7

                # An unknown tool's error lists only the tools bob is offered.
                fake.enqueue(FakeResponse.sse(openai_tool_call("call_u", "nope", {})))
                fake.enqueue(FakeResponse.sse(openai_text("Unknown.")))
                stream = await turn(bob, thread_b, "openai:gpt-4o", "call nope")
                [error] = stream.of_type("tool-output-error")
                assert error["errorText"] == (
                    "unknown tool 'nope'; the tools are: " + ", ".join(OPEN_TOOLS))
    assert not bob_file.exists()


async def test_a_user_offered_no_tool_still_gets_an_error_not_a_run_or_an_approval(
    database_url: str, tmp_path: Path,
) -> None:
    # Only a restricted server, needing approval: bob is offered nothing at all.
    servers = {"team": {**SERVER, "users": ["alice"], "approval": "always"}}
    bob_file = tmp_path / "bob"
    async with run_gateway(database_url, **env(servers)) as gw:
        _, bob_key = await gw.new_user("bob")
        async with gw.client(key=bob_key) as bob:
            thread = await gw.new_thread(bob)
            stream = await turn(bob, thread, scripted_touch("team__touch", bob_file))
            assert not stream.of_type("tool-approval-request")
            [error] = stream.of_type("tool-output-error")
            assert error["errorText"] == withheld_text("team__touch")
            assert stream.text.startswith("team__touch answered: Error: ")
            assert stream.of_type("finish")[0]["finishReason"] == "stop"
            row = await last_reply(bob, thread)
            assert row["status"] == "complete"
            assert row["content"][0]["errorText"] == withheld_text("team__touch")
    assert not bob_file.exists()


async def test_an_approved_call_does_not_run_once_its_user_is_no_longer_listed(
    database_url: str, tmp_path: Path,
) -> None:
    listed = {"team": {**SERVER, "users": ["alice"], "approval": "always"}}
    before, after = tmp_path / "before", tmp_path / "after"
    # alice's call of a listed server's tool waits for approval, then runs once approved.
    async with run_gateway(database_url, **env(listed)) as gw, gw.client() as alice:
        thread = await gw.new_thread(alice)
        paused = await turn(alice, thread, scripted_touch("team__touch", before))
        [request] = paused.of_type("tool-approval-request")
        turn_id = (await last_reply(alice, thread))["turn_id"]
        done = await stream_request(alice, "POST",
                                    f"/v1/threads/{thread}/turns/{turn_id}/continue",
                                    json={"approvals": [{"approvalId": request["approvalId"],
                                                         "approved": True}]})
        assert done.of_type("tool-output-available")[0]["output"] == {"result": f"touched {before}"}
        assert before.exists()

        paused = await turn(alice, thread, scripted_touch("team__touch", after))
        [request] = paused.of_type("tool-approval-request")
        turn_id = (await last_reply(alice, thread))["turn_id"]
    # The gateway restarts with alice no longer listed while her call waits.
    unlisted = {"team": {**SERVER, "users": ["carol"], "approval": "always"}}
    async with run_gateway(database_url, **env(unlisted)) as gw, gw.client() as alice:
        done = await stream_request(alice, "POST",
                                    f"/v1/threads/{thread}/turns/{turn_id}/continue",
                                    json={"approvals": [{"approvalId": request["approvalId"],
                                                         "approved": True}]})
        validate_ui_stream(done, continues=frozenset({request["toolCallId"]}))
        assert not done.of_type("tool-output-available")
        [error] = done.of_type("tool-output-error")
        assert error == {"type": "tool-output-error", "toolCallId": request["toolCallId"],
                         "errorText": withheld_text("team__touch")}
        row = await last_reply(alice, thread)
        assert row["status"] == "complete"
        assert row["content"][0]["errorText"] == withheld_text("team__touch")
    assert not after.exists()


async def test_user_names_are_read_once_per_user(store: Store,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    config = McpConfig((ServerConfig("team", "stdio", command="x", users=frozenset({"ann"})),))
    hub = ToolHub(config)  # not entered: no server runs, the rules are known
    ann = await store.create_user("ann")
    ben = await store.create_user("ben")
    assert (await toolbox_for(hub, store, ann)).user == "ann"
    assert (await toolbox_for(hub, store, 10**9)).user is None  # no such user
    # Names do not change, so the second turn does not read it again.
    await store._run(lambda c: c.execute("UPDATE users SET name = 'zed' WHERE id = :id",
                                         {"id": ann}), write=True)
    assert (await toolbox_for(hub, store, ann)).user == "ann"
    # A server open to all needs no name: nothing is read.
    open_hub = ToolHub(McpConfig((ServerConfig("all", "stdio", command="x"),)))
    assert (await toolbox_for(open_hub, store, ben)).user is None
    assert open_hub.user_names == {}
    # The cache starts afresh when full.
    monkeypatch.setattr("gateway.turn.tools.USER_NAMES_CACHED", 1)
    assert (await toolbox_for(hub, store, ben)).user == "ben"
    assert hub.user_names == {ben: "ben"}
    assert (await toolbox_for(hub, store, ann)).user == "zed"


async def test_the_gateway_server_fixture_user_is_alice(gateway: GatewayServer) -> None:
    # The tests above list "alice" as the fixture's own user.
    assert await gateway.store.user_name(gateway.user_id) == "alice"
