"""``TURNGATE_MCP_CONFIG`` parsing and the model-facing tool names."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.ops.settings import Settings
from gateway.tools.config import DEFAULT_TIMEOUT_SECONDS, load_config, parse_config
from gateway.tools.names import MAX_LENGTH, VALID, assign_names, sanitize
from turngate.exceptions import ConfigError

FULL = {
    "mcpServers": {
        "time": {"command": "mcp-server-time", "args": ["--local-timezone", "UTC"],
                 "env": {"TZ": "UTC"}, "approval": ["convert_time"]},
        "docs": {"type": "http", "url": "http://127.0.0.1:9/mcp",
                 "headers": {"authorization": "Bearer k"}, "approval": "always",
                 "timeoutSeconds": 2.5},
        "off": {"command": "x", "disabled": True},
    }
}


def test_full_config() -> None:
    config = parse_config(FULL)
    assert [s.name for s in config.servers] == ["time", "docs"]  # "off" is disabled
    time, docs = config.servers
    assert (time.transport, time.command, time.args, dict(time.env)) == (
        "stdio", "mcp-server-time", ("--local-timezone", "UTC"), {"TZ": "UTC"})
    assert time.timeout_seconds == DEFAULT_TIMEOUT_SECONDS
    assert time.needs_approval("convert_time") and not time.needs_approval("get_current_time")
    assert (docs.transport, docs.url, dict(docs.headers)) == (
        "http", "http://127.0.0.1:9/mcp", {"authorization": "Bearer k"})
    assert docs.needs_approval("anything") and docs.timeout_seconds == 2.5
    assert "Bearer" not in repr(docs)  # headers carry secrets
    assert not parse_config({"mcpServers": {"t": {"command": "x"}}}).servers[0].needs_approval("y")


BAD: list[tuple[Any, str, str]] = [
    ([], "", "mcpServers"),
    ({"servers": {}}, "", "mcpServers"),
    ({"mcpServers": {}, "extra": 1}, "", "'extra'"),
    ({"mcpServers": {"t": "mcp-server-time"}}, "'t'", "command"),
    ({"mcpServers": {"t": {}}}, "'t'", "exactly one of"),
    ({"mcpServers": {"t": {"command": "a", "url": "http://h/mcp"}}}, "'t'", "exactly one of"),
    ({"mcpServers": {"t": {"command": ""}}}, "'t'", "\"command\""),
    ({"mcpServers": {"t": {"command": "a", "args": "x y"}}}, "'t'", "\"args\""),
    ({"mcpServers": {"t": {"command": "a", "env": {"A": 1}}}}, "'t'", "\"env\""),
    ({"mcpServers": {"t": {"command": "a", "headers": {}}}}, "'t'", "'headers'"),
    ({"mcpServers": {"t": {"command": "a", "timeout": 5}}}, "'t'", "'timeout'"),
    ({"mcpServers": {"t": {"command": "a", "timeoutSeconds": 0}}}, "'t'", "timeoutSeconds"),
    ({"mcpServers": {"t": {"command": "a", "timeoutSeconds": "5"}}}, "'t'", "timeoutSeconds"),
    ({"mcpServers": {"t": {"command": "a", "timeoutSeconds": True}}}, "'t'", "timeoutSeconds"),
    ({"mcpServers": {"t": {"command": "a", "approval": "sometimes"}}}, "'t'", "approval"),
    ({"mcpServers": {"t": {"command": "a", "approval": [1]}}}, "'t'", "approval"),
    ({"mcpServers": {"t": {"command": "a", "disabled": "no"}}}, "'t'", "disabled"),
    ({"mcpServers": {"t": {"command": "a", "type": "sse"}}}, "'t'", "'sse'"),
    ({"mcpServers": {"t": {"command": "a", "type": "http"}}}, "'t'", "\"type\""),
    ({"mcpServers": {"d": {"url": "ftp://h/mcp"}}}, "'d'", "\"url\""),
    ({"mcpServers": {"d": {"url": "http://h/mcp", "args": []}}}, "'d'", "'args'"),
    ({"mcpServers": {"d": {"url": "http://h/mcp", "headers": ["a"]}}}, "'d'", "\"headers\""),
    ({"mcpServers": {" ": {"command": "a"}}}, "' '", "empty"),
]


@pytest.mark.parametrize(("data", "server", "key"), BAD)
def test_bad_config_names_server_and_key(data: Any, server: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    message = str(info.value)
    assert message.startswith("TURNGATE_MCP_CONFIG: ")
    assert server in message and key in message and "must" in message


def test_load_from_file_and_inline(tmp_path: Path) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps(FULL))
    from_file = load_config("TURNGATE_MCP_CONFIG", str(path))
    assert from_file == parse_config(FULL)
    assert load_config("TURNGATE_MCP_CONFIG", json.dumps(FULL)) == from_file
    assert load_config("TURNGATE_MCP_CONFIG", "  ") is None
    settings_ = Settings.from_env({"TURNGATE_MCP_CONFIG": str(path)})
    assert settings_.mcp_config == from_file
    assert Settings.from_env({}).mcp_config is None


def test_new_settings_defaults() -> None:
    defaults = Settings.from_env({})
    assert (defaults.max_steps, defaults.title_model) == (10, None)
    custom = Settings.from_env({"TURNGATE_MAX_STEPS": "3", "TURNGATE_TITLE_MODEL": "openai:x"})
    assert (custom.max_steps, custom.title_model) == (3, "openai:x")


def test_unreadable_file_and_bad_json_name_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"TURNGATE_MCP_CONFIG=.*readable JSON file"):
        load_config("TURNGATE_MCP_CONFIG", str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{\"mcpServers\": ")
    with pytest.raises(ConfigError, match=r"TURNGATE_MCP_CONFIG: must be valid JSON"):
        load_config("TURNGATE_MCP_CONFIG", str(tmp_path / "bad.json"))


# -- "users" ---------------------------------------------------------------------------


def test_users_say_who_may_use_a_server() -> None:
    config = parse_config({"mcpServers": {
        "open": {"command": "a"},
        "team": {"command": "b", "users": ["alice", "Bob Smith"]},
        "nobody": {"url": "http://h/mcp", "users": []},
    }})
    open_, team, nobody = config.servers
    assert open_.users is None and team.users == {"alice", "Bob Smith"} and nobody.users == set()
    assert open_.allows("anyone") and open_.allows(None)
    assert team.allows("alice") and team.allows("Bob Smith")
    assert not team.allows("bob smith") and not team.allows("carol") and not team.allows(None)
    assert not nobody.allows("alice")


@pytest.mark.parametrize(("value", "shown"), [
    ("alice", '"alice"'),
    (["alice", ""], '["alice", ""]'),
    (["alice", "  "], '["alice", "  "]'),
    (["alice", 7], '["alice", 7]'),
    ({"alice": True}, '{"alice": true}'),
    (None, "null"),
    ([["alice"]], '[["alice"]]'),
])
def test_bad_users_show_the_value_and_what_was_expected(value: Any, shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"mcpServers": {"team": {"command": "a", "users": value}}})
    assert str(info.value) == (
        f"TURNGATE_MCP_CONFIG: server 'team': \"users\" is {shown}: it must be a list of "
        "user names (non-empty strings), e.g. [\"alice\", \"bob\"]")


def test_a_long_bad_users_value_is_cut_in_the_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"mcpServers": {"team": {"command": "a", "users": ["x" * 500, 1]}}})
    assert len(str(info.value)) < 260 and '"users" is ["xxx' in str(info.value)
    assert "...: it must be a list of user names" in str(info.value)


# -- names -----------------------------------------------------------------------------


def test_plain_names() -> None:
    names = assign_names([("time", "get_current_time"), ("docs", "search")])
    assert names == {("time", "get_current_time"): "time__get_current_time",
                     ("docs", "search"): "docs__search"}


def test_invalid_characters_and_collisions() -> None:
    names = assign_names([("my.server", "look up"), ("my_server", "look_up"), ("x", "ok")])
    a, b = names[("my.server", "look up")], names[("my_server", "look_up")]
    # Both would be my_server__look_up: neither gets it, each gets its own hash.
    assert a != b and a.startswith("my_server__look_up_") and b.startswith("my_server__look_up_")
    assert len(a) == len(b) == len("my_server__look_up_") + 8
    assert names[("x", "ok")] == "x__ok"


def test_long_names_are_cut_with_a_hash() -> None:
    server, tool = "s" * 30, "t" * 40
    name = assign_names([(server, tool)])[(server, tool)]
    assert len(name) == MAX_LENGTH and VALID.match(name)
    assert name.startswith("s" * 30 + "__") and name[-9] == "_"


pairs = st.lists(
    st.tuples(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=80)),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(pairs, st.randoms(use_true_random=False))
def test_names_are_valid_unique_and_stable(items: list[tuple[str, str]],
                                           rnd: random.Random) -> None:
    names = assign_names(items)
    assert set(names) == set(items)
    assert len(set(names.values())) == len(names)
    for (server, tool), name in names.items():
        assert VALID.match(name), name
        prefix = sanitize(server)[:20]
        assert name.startswith(prefix)  # says which server it comes from
        candidate = sanitize(f"{server}__{tool}")
        if len(candidate) <= MAX_LENGTH and sum(
            sanitize(f"{s}__{t}") == candidate for s, t in names
        ) == 1:
            assert name == candidate
    shuffled = list(items)
    rnd.shuffle(shuffled)
    assert assign_names(shuffled) == names
