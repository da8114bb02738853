"""The built-in HTTP adapters use the endpoints and keys the gateway's settings
validated (``gateway.app.provider_configs``), not the environment read again; the
registry hands them over, and ``GET /v1/models`` judges "configured" from them too.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from gateway.app import provider_configs
from gateway.ops.settings import Settings
from llm_adapters.anthropic import AnthropicAdapter
from llm_adapters.base import ProviderConfig
from llm_adapters.openai import OpenAIAdapter
from llm_adapters.registry import AdapterRegistry
from llm_adapters.scripted import ScriptedAdapter
from tests.fixtures_server import run_gateway
from tests.sse_client import stream_request
from tests.stream_corpus import case
from tests.upstream_fakes import FakeResponse, FakeUpstream

pytestmark = pytest.mark.anyio

OPENAI_TEXT = case("openai-text")
ANTHROPIC_TEXT = case("anthropic-text")
DEAD = "http://127.0.0.1:9"  # the discard port: nothing listens there


def test_provider_configs_are_the_validated_settings() -> None:
    settings = Settings.from_env({
        "DATABASE_URL": "sqlite:///unused.db",
        "OPENAI_BASE_URL": "  http://127.0.0.1:8001/v1/ ",
        "OPENAI_API_KEY": " sk-o ",
        "ANTHROPIC_API_KEY": "ak-a",
    })
    configs = provider_configs(settings)
    assert configs["openai"] == ProviderConfig("http://127.0.0.1:8001/v1", "sk-o")
    assert configs["anthropic"] == ProviderConfig("https://api.anthropic.com", "ak-a")
    assert "sk-o" not in repr(configs["openai"])  # a key never shows in a repr


def test_the_registry_gives_built_in_adapters_their_config_and_reads_no_env() -> None:
    env = {"OPENAI_BASE_URL": f"{DEAD}/v1", "OPENAI_API_KEY": "sk-env",
           "ANTHROPIC_BASE_URL": DEAD, "ANTHROPIC_API_KEY": "ak-env"}
    registry = AdapterRegistry(env, {
        "openai": ProviderConfig("http://127.0.0.1:8001/v1", "sk-config"),
        "anthropic": ProviderConfig("", "ak-config"),
        "echo2": ProviderConfig("http://ignored", "x"),  # not a built-in: not kept
    })
    openai = registry.get("openai")
    anthropic = registry.get("anthropic")
    assert isinstance(openai, OpenAIAdapter) and isinstance(anthropic, AnthropicAdapter)
    assert (openai.base_url, openai.api_key) == ("http://127.0.0.1:8001/v1", "sk-config")
    # an empty base URL is the provider's own endpoint, not the environment's
    assert (anthropic.base_url, anthropic.api_key) == ("https://api.anthropic.com", "ak-config")
    assert registry.config("echo2") is None


def test_a_factory_registered_by_hand_gets_the_environment_only() -> None:
    seen: list[Mapping[str, str]] = []

    def factory(env: Mapping[str, str]) -> ScriptedAdapter:
        seen.append(env)
        return ScriptedAdapter(env)

    env = {"OPENAI_API_KEY": "sk-env"}
    registry = AdapterRegistry(env, {"openai": ProviderConfig("http://127.0.0.1:8001/v1", "k")})
    registry.register("openai", factory)
    assert isinstance(registry.get("openai"), ScriptedAdapter)
    assert seen == [env]


def test_without_a_config_an_adapter_reads_the_environment_as_the_sdk_does() -> None:
    adapter = OpenAIAdapter({"OPENAI_BASE_URL": "http://127.0.0.1:8001/v1/",
                             "OPENAI_API_KEY": " sk-env "})
    assert (adapter.base_url, adapter.api_key) == ("http://127.0.0.1:8001/v1", "sk-env")


async def test_turns_and_model_lists_use_the_settings_not_the_environment_read_again(
    database_url: str,
) -> None:
    """After start-up the environment mapping the settings came from says something
    else; turns still go to the endpoints, with the keys, that the settings hold, and
    ``GET /v1/models`` still counts both providers as configured."""
    listing = {"object": "list", "data": [{"id": "gpt-4o", "object": "model"}]}
    async with FakeUpstream() as fake:
        fake.enqueue(
            FakeResponse.sse(OPENAI_TEXT.body(), delay=0.0),
            FakeResponse.sse(ANTHROPIC_TEXT.body(), delay=0.0),
            FakeResponse.json(200, listing),
            FakeResponse.json(200, {"data": [{"id": "claude-sonnet-4-5"}]}),
        )
        env = {"OPENAI_BASE_URL": fake.url + "/v1", "OPENAI_API_KEY": "sk-settings",
               "ANTHROPIC_BASE_URL": fake.url, "ANTHROPIC_API_KEY": "ak-settings"}
        async with run_gateway(database_url, **env) as gw, gw.client() as client:
            environ = gw.ctx.settings.environ
            assert isinstance(environ, dict)
            environ.update({"OPENAI_BASE_URL": f"{DEAD}/v1", "ANTHROPIC_BASE_URL": DEAD})
            del environ["OPENAI_API_KEY"], environ["ANTHROPIC_API_KEY"]
            texts = []
            for model in ("openai:gpt-4o", "anthropic:claude-sonnet-4-5"):
                thread = await gw.new_thread(client)
                s = await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                         json={"turn_id": f"t-{model[:6]}", "text": "Hi",
                                               "model": model})
                assert s.status == 200
                texts.append(s.text)
            models = (await client.get("/v1/models")).json()
    assert texts == [OPENAI_TEXT.text, ANTHROPIC_TEXT.text]
    openai_req, anthropic_req = fake.requests[0], fake.requests[1]
    assert openai_req.path == "/v1/chat/completions"
    assert openai_req.headers["authorization"] == "Bearer sk-settings"
    assert anthropic_req.path == "/v1/messages"
    assert anthropic_req.headers["x-api-key"] == "ak-settings"
    status = {a["name"]: a["status"] for a in models["adapters"]}
    assert status["openai"] == "ok" and status["anthropic"] == "ok"
    assert {r.path for r in fake.requests[2:]} == {"/v1/models", "/v1/models?limit=1000"}
