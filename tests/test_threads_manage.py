"""Rename and delete a thread, list the models, and a failed reply's stored reason.

Over real HTTP on both databases (``gateway`` is parametrized sqlite/postgresql);
``GET /v1/models`` also against a fake OpenAI-compatible upstream.
"""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest

from gateway.api.models import SCRIPTED_PRESETS
from llm_adapters.scripted import parse_options
from tests.fixtures_server import GatewayServer, run_gateway
from tests.sse_client import stream_request
from tests.upstream_fakes import FakeResponse, FakeUpstream

pytestmark = pytest.mark.anyio


async def _turn(client: Any, thread: str, turn: str, model: str, text: str = "one two") -> Any:
    return await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                json={"turn_id": turn, "text": text, "model": model})


# ---- PATCH /v1/threads/{id} ---------------------------------------------------


async def test_rename_sets_the_title_and_moves_the_thread_up(gateway: GatewayServer) -> None:
    async with gateway.client() as client:
        a = await gateway.new_thread(client)
        b = await gateway.new_thread(client)
        r = await client.patch(f"/v1/threads/{a}", json={"title": "  Trip   plans "})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"] == a and body["title"] == "Trip plans"
        listed = (await client.get("/v1/threads")).json()["threads"]
        assert [t["id"] for t in listed][:2] == [a, b]
        assert listed[0]["title"] == "Trip plans"
        row = await gateway.store.get_thread(a, gateway.user_id)
        assert row is not None and row.title == "Trip plans"
        # null (or only spaces) clears it
        r = await client.patch(f"/v1/threads/{a}", json={"title": "   "})
        assert r.status_code == 200 and r.json()["title"] is None


@pytest.mark.parametrize(("body", "code", "words"), [
    ({"title": 5}, "invalid_title", "not int"),
    ({"title": "x" * 501}, "invalid_title", "at most 500 characters"),
    ({}, "invalid_title", "title is required"),
    ({"title": "ok", "colour": "red"}, "invalid_body", "'colour'"),
    ([1], "invalid_body", "JSON object"),
])
async def test_rename_bad_input_is_400_and_writes_nothing(
    gateway: GatewayServer, body: Any, code: str, words: str
) -> None:
    async with gateway.client() as client:
        thread = (await client.post("/v1/threads", json={"title": "before"})).json()["id"]
        r = await client.patch(f"/v1/threads/{thread}", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == code
        assert words in r.json()["error"]["message"]
        row = await gateway.store.get_thread(thread, gateway.user_id)
        assert row is not None and row.title == "before"


async def test_rename_and_delete_of_another_users_thread_are_404(gateway: GatewayServer) -> None:
    _, other_key = await gateway.new_user("mallory")
    async with gateway.client() as client:
        thread = (await client.post("/v1/threads", json={"title": "mine"})).json()["id"]
        await _turn(client, thread, "t1", "scripted")
    async with httpx.AsyncClient(base_url=gateway.url, headers=gateway.auth(other_key)) as other:
        for r in (await other.patch(f"/v1/threads/{thread}", json={"title": "x"}),
                  await other.delete(f"/v1/threads/{thread}"),
                  await other.patch("/v1/threads/nope", json={"title": "x"}),
                  await other.delete("/v1/threads/nope")):
            assert r.status_code == 404, r.text
            assert r.json()["error"]["code"] == "thread_not_found"
    row = await gateway.store.get_thread(thread, gateway.user_id)
    assert row is not None and row.title == "mine"
    rows = await gateway.store.list_messages(thread, gateway.user_id)
    assert rows is not None and len(rows) == 2
    async with gateway.client() as anonymous:
        r = await anonymous.delete(f"/v1/threads/{thread}", headers={"authorization": "Bearer x"})
        assert r.status_code == 401


# ---- DELETE /v1/threads/{id} --------------------------------------------------


async def test_delete_removes_thread_and_messages_and_keeps_usage(gateway: GatewayServer) -> None:
    async with gateway.client() as client:
        thread = await gateway.new_thread(client)
        keep = await gateway.new_thread(client)
        await _turn(client, thread, "t1", "scripted:tokens=3")
        await _turn(client, thread, "t2", "scripted:tokens=4")
        await _turn(client, keep, "k1", "scripted:tokens=2")
        before = (await client.get("/v1/usage")).json()["usage"]
        assert len(before) == 3
        r = await client.delete(f"/v1/threads/{thread}")
        assert r.status_code == 200, r.text
        assert r.json() == {"id": thread, "deleted": True, "messages_deleted": 4,
                            "cancelled_turn": None}
        # gone from every thread route
        assert (await client.get(f"/v1/threads/{thread}/messages")).status_code == 404
        assert (await client.delete(f"/v1/threads/{thread}")).status_code == 404
        assert (await client.get("/v1/usage", params={"thread_id": thread})).status_code == 404
        assert [t["id"] for t in (await client.get("/v1/threads")).json()["threads"]] == [keep]
        # the usage rows stay, listed under the deleted thread's id
        after = (await client.get("/v1/usage")).json()["usage"]
        assert after == before
        assert sorted(u["thread_id"] for u in after) == sorted([thread, thread, keep])
    assert await gateway.store.get_thread(thread, gateway.user_id) is None
    assert await gateway.store.list_messages(keep, gateway.user_id)


async def test_delete_cancels_and_finalizes_a_running_turn_first(gateway: GatewayServer) -> None:
    async with gateway.client() as client:
        thread = await gateway.new_thread(client)
        seen = anyio.Event()
        result: dict[str, Any] = {}

        async def reader() -> None:
            async with client.stream("POST", f"/v1/threads/{thread}/turns", json={
                "turn_id": "long", "text": "x", "model": "scripted:tokens=1000,delay_ms=20",
            }) as response:
                lines = []
                async for line in response.aiter_lines():
                    lines.append(line)
                    if '"text-delta"' in line:
                        seen.set()
                result["lines"] = lines

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            with anyio.fail_after(10):
                await seen.wait()
            r = await client.delete(f"/v1/threads/{thread}")
        assert r.status_code == 200, r.text
        assert r.json()["cancelled_turn"] == "long" and r.json()["messages_deleted"] == 2
        # the stream ended properly (abort, finish, [DONE]) and one usage row was written
        assert any('"abort"' in line for line in result["lines"])
        assert result["lines"][-1] == "data: [DONE]" or "data: [DONE]" in result["lines"]
        usage = (await client.get("/v1/usage")).json()["usage"]
        assert len(usage) == 1 and usage[0]["thread_id"] == thread
        assert 0 < usage[0]["completion_tokens"] < 1000
    assert gateway.ctx.relay.running_on_thread(thread) is None
    # the thread id is free again afterwards
    async with gateway.client() as client:
        again = await client.post("/v1/threads", json={"id": thread})
        assert again.status_code == 201


# ---- a failed reply keeps its reason ------------------------------------------


async def test_failed_reply_stores_its_error_reason(gateway: GatewayServer) -> None:
    async with gateway.client() as client:
        thread = await gateway.new_thread(client)
        live = await _turn(client, thread, "t1", "scripted:tokens=9,fail_after=2")
        live_error = [c["errorText"] for c in live.chunks if c["type"] == "error"]
        assert live_error, live.chunks
        empty = await _turn(client, thread, "t2", "scripted:tokens=9,fail_after=0")
        rows = (await client.get(f"/v1/threads/{thread}/messages")).json()["messages"]
        first, second = rows[1], rows[3]
        assert first["status"] == "error"
        assert first["content"][-1] == {"type": "error", "errorText": live_error[0]}
        assert first["content"][0] == {"type": "text", "text": "w1 w2 "}
        assert second["status"] == "error"
        empty_error = [c["errorText"] for c in empty.chunks if c["type"] == "error"]
        assert second["content"] == [{"type": "error", "errorText": empty_error[0]}]
        # the UI format carries it as metadata, not as text the model said
        ui = (await client.get(f"/v1/threads/{thread}/messages",
                               params={"format": "ui"})).json()["messages"]
        assert ui[1]["metadata"]["errorText"] == live_error[0]
        assert [p["type"] for p in ui[1]["parts"]] == ["step-start", "text"]
        assert ui[3]["parts"] == [] and ui[3]["metadata"]["errorText"] == empty_error[0]
        # a replay of the stored turn tells the same reason
        replay = await _turn(client, thread, "t1", "scripted:tokens=9,fail_after=2")
        assert [c["errorText"] for c in replay.chunks if c["type"] == "error"] == live_error


# ---- the scripted adapter's verbatim echo -------------------------------------


async def test_scripted_chunk_echoes_the_text_verbatim(gateway: GatewayServer) -> None:
    text = "# Title\n\n- **a**\n- `b`\n\n<img src=x onerror=alert(1)>  end"
    async with gateway.client() as client:
        thread = await gateway.new_thread(client)
        r = await _turn(client, thread, "t1", "scripted:chunk=5", text=text)
        deltas = [c["delta"] for c in r.chunks if c["type"] == "text-delta"]
        assert "".join(deltas) == text
        assert all(len(d) <= 5 for d in deltas) and len(deltas) == -(-len(text) // 5)
    assert parse_options("chunk=3").chunk == 3
    with pytest.raises(ValueError, match="chunk"):
        parse_options("chunk=x")


# ---- GET /v1/models -----------------------------------------------------------


async def test_models_lists_scripted_presets_and_the_default(gateway: GatewayServer) -> None:
    async with gateway.client() as client:
        r = await client.get("/v1/models")
        assert r.status_code == 200, r.text
        body = r.json()
    assert body["default"] == "scripted" and body["default_priced"] is True
    assert body["limits"] == {"max_text_chars": 100000, "max_images": 4,
                              "max_image_bytes": 8388608, "max_body_bytes": 50331648}
    ids = [m["id"] for m in body["models"]]
    scripted = [m["id"] for m in body["models"] if m["adapter"] == "scripted"]
    assert scripted == [p[0] for p in SCRIPTED_PRESETS]
    assert all(m["adapter"] == "scripted" and m["priced"] for m in body["models"]
               if m["adapter"] == "scripted")
    by_name = {a["name"]: a for a in body["adapters"]}
    # no OpenAI/Anthropic key in the test environment: not asked, said so
    assert by_name["openai"]["status"] == "unconfigured"
    assert by_name["anthropic"]["status"] == "unconfigured"
    # the third-party adapter installed for the tests is listed by its name
    assert "echo2" in ids and by_name["echo2"]["status"] == "ok"
    # every listed scripted preset is a model string a turn accepts
    for model_id, _ in SCRIPTED_PRESETS:
        parse_options(model_id.partition(":")[2])
    async with gateway.client() as client:
        assert (await client.get("/v1/models", headers={"authorization": "Bearer no"})
                ).status_code == 401


async def test_models_asks_the_openai_endpoint_once_and_caches(database_url: str) -> None:
    listing = {"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"},
                                          {"id": "local-llama", "object": "model"}]}
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.json(200, listing))
        env = {"OPENAI_BASE_URL": fake.url + "/v1", "OPENAI_API_KEY": "sk-test"}
        async with run_gateway(database_url, **env) as gw, gw.client() as client:
            first = (await client.get("/v1/models")).json()
            second = (await client.get("/v1/models")).json()
    assert first == second
    assert len(fake.requests) == 1
    req = fake.requests[0]
    assert req.path == "/v1/models" and req.headers["authorization"] == "Bearer sk-test"
    openai = [m for m in first["models"] if m["adapter"] == "openai"]
    assert [m["id"] for m in openai] == ["openai:gpt-4o-mini", "openai:local-llama"]
    assert [m["priced"] for m in openai] == [True, False]
    assert {"name": "openai", "status": "ok"} in first["adapters"]


async def test_models_reports_an_unreachable_upstream_and_lists_the_rest(
    database_url: str,
) -> None:
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.json(401, {"error": {"message": "bad key"}}))
        env = {"OPENAI_BASE_URL": fake.url + "/v1", "OPENAI_API_KEY": "sk-bad"}
        async with run_gateway(database_url, **env) as gw, gw.client() as client:
            body = (await client.get("/v1/models")).json()
    by_name = {a["name"]: a for a in body["adapters"]}
    assert by_name["openai"] == {"name": "openai", "status": "unavailable",
                                 "error": "openai model list answered HTTP 401"}
    assert "sk-bad" not in str(body)
    assert any(m["id"] == "scripted" for m in body["models"])


async def test_models_retries_a_failed_list_after_its_shorter_ttl(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.api import models as routes_models

    listing = {"data": [{"id": "m1"}]}
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.json(500, {"error": "down"}), FakeResponse.json(200, listing))
        env = {"OPENAI_BASE_URL": fake.url + "/v1", "OPENAI_API_KEY": "k"}
        async with run_gateway(database_url, **env) as gw, gw.client() as client:
            first = (await client.get("/v1/models")).json()
            cached = (await client.get("/v1/models")).json()
            assert len(fake.requests) == 1 and cached == first  # within 30 s: not asked again
            monkeypatch.setattr(routes_models, "FAILED_TTL", 0.0)
            again = (await client.get("/v1/models")).json()
    assert routes_models.FAILED_TTL == 0.0 and len(fake.requests) == 2
    assert {"name": "openai", "status": "ok"} in again["adapters"]
    assert "openai:m1" in [m["id"] for m in again["models"]]


async def test_models_lists_anthropics_models(database_url: str) -> None:
    listing = {"data": [{"id": "claude-sonnet-4-20250514", "type": "model"}], "has_more": False}
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.json(200, listing))
        env = {"ANTHROPIC_BASE_URL": fake.url, "ANTHROPIC_API_KEY": "ak-test"}
        async with run_gateway(database_url, **env) as gw, gw.client() as client:
            body = (await client.get("/v1/models")).json()
    req = fake.requests[0]
    assert req.path.startswith("/v1/models") and req.headers["x-api-key"] == "ak-test"
    assert req.headers["anthropic-version"]
    assert {"id": "anthropic:claude-sonnet-4-20250514", "adapter": "anthropic",
            "label": "anthropic:claude-sonnet-4-20250514", "priced": True} in body["models"]


async def test_usage_names_unpriced_models(gateway: GatewayServer) -> None:
    async with gateway.client() as client:
        thread = await gateway.new_thread(client)
        await _turn(client, thread, "t1", "scripted")
        await _turn(client, thread, "t2", "echo2")
        usage = (await client.get("/v1/usage")).json()["usage"]
    by_model = {next(iter(u["model_breakdown"])): u for u in usage}
    assert len(by_model) == 2, by_model.keys()
    priced = [u for u in usage if u["unpriced_models"] == []]
    unpriced = [u for u in usage if u["unpriced_models"]]
    assert len(priced) == 1 and len(unpriced) == 1
    assert unpriced[0]["cost_micros"] == 0
    assert unpriced[0]["unpriced_models"] == list(unpriced[0]["model_breakdown"])


async def test_cors_allows_rename_and_delete_from_a_browser(database_url: str) -> None:
    origin = "https://chat.example"
    async with run_gateway(database_url, TURNGATE_CORS_ORIGINS=origin) as gw, \
            httpx.AsyncClient(base_url=gw.url, timeout=30) as raw:
        for method in ("PATCH", "DELETE"):
            pre = await raw.options("/v1/threads/abc", headers={
                "origin": origin, "access-control-request-method": method,
                "access-control-request-headers": "authorization,content-type"})
            assert pre.status_code == 200, pre.text
            assert method in pre.headers["access-control-allow-methods"]
