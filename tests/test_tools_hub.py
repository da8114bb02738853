"""The tool hub against real MCP servers: ``mcp-server-time`` (from PyPI, over stdio),
``tests/mcp_servers.py`` over stdio and over streamable HTTP (uvicorn on a free port);
a server that does not start, one that crashes mid-call, one that hangs."""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from gateway.tools.config import parse_config
from gateway.tools.servers import ToolError, ToolHub, ToolServerStartError
from tests.mcp_servers import http_server

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
TIME_SERVER = str(Path(sys.executable).parent / "mcp-server-time")
TEST_SERVER: dict[str, Any] = {"command": sys.executable, "args": ["-m", "tests.mcp_servers"],
                               "cwd": str(ROOT)}


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


async def wait_until(condition: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await anyio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_time_server_over_stdio() -> None:
    config = parse_config({"mcpServers": {"time": {
        "command": TIME_SERVER, "args": ["--local-timezone", "UTC"],
        "approval": ["convert_time"]}}})
    before = children()
    async with ToolHub(config) as hub:
        assert [t.name for t in hub.tools] == ["time__convert_time", "time__get_current_time"]
        tool = hub.get("time__get_current_time")
        assert tool is not None and (tool.server, tool.tool) == ("time", "get_current_time")
        assert tool.input_schema["required"] == ["timezone"]
        assert [s.name for s in hub.specs] == ["time__convert_time", "time__get_current_time"]
        assert hub.needs_approval("time__convert_time")
        assert not hub.needs_approval("time__get_current_time")
        assert not hub.needs_approval("nope")

        result = await hub.call("time__get_current_time", {"timezone": "Asia/Tokyo"})
        assert result["timezone"] == "Asia/Tokyo" and result["datetime"].endswith("+09:00")

        with pytest.raises(ToolError, match=r"tool 'time__get_current_time' failed: .*Nowhere/X"):
            await hub.call("time__get_current_time", {"timezone": "Nowhere/X"})
        with pytest.raises(ToolError, match=r"unknown tool 'time__nope'; the tools are: "
                                            r"time__convert_time, time__get_current_time"):
            await hub.call("time__nope", {})
        assert len(children() - before) == 1  # the server process
    assert children() == before  # and it is gone with the hub


async def test_streamable_http_server() -> None:
    async with http_server() as web:
        config = parse_config({"mcpServers": {"web": {
            "url": web.url, "headers": {"authorization": "Bearer s3cret"}}}})
        async with ToolHub(config) as hub:
            assert "web__add" in {t.name for t in hub.tools}
            assert await hub.call("web__add", {"a": 2, "b": 40}) == {"sum": 42}
            assert await hub.call("web__echo", {"text": "héllo"}) == {"result": "héllo"}
            with pytest.raises(ToolError, match=r"tool 'web__fail' failed"):
                await hub.call("web__fail", {"reason": "no"})
            with pytest.raises(ToolError, match=r"tool 'web__add' failed"):
                await hub.call("web__add", {"a": "x"})  # the server rejects the arguments
        assert web.authorizations and set(web.authorizations) == {"Bearer s3cret"}


async def test_http_server_that_goes_away_is_reconnected() -> None:
    async with http_server() as web:
        port = int(web.url.split(":")[2].split("/")[0])
        config = parse_config({"mcpServers": {"web": {"url": web.url, "timeoutSeconds": 5}}})
        async with ToolHub(config, restart_delay=0.05, max_restart_delay=0.2) as hub:
            assert await hub.call("web__add", {"a": 1, "b": 2}) == {"sum": 3}
            await web.stop()
            with pytest.raises(ToolError, match=r"MCP server 'web' stopped during the call of "
                                                r"'web__add'; it is being restarted"):
                await hub.call("web__add", {"a": 1, "b": 2})
            async with http_server(port):
                assert await hub.call("web__add", {"a": 2, "b": 2}) == {"sum": 4}
            assert hub.starts("web") >= 2


async def test_servers_that_do_not_start_are_named() -> None:
    config = parse_config({"mcpServers": {
        "good": TEST_SERVER,
        "missing": {"command": "/no/such/mcp-server"},
        "exits": {"command": sys.executable, "args": ["-c", "raise SystemExit(3)"]},
        "web": {"url": f"http://127.0.0.1:{free_port()}/mcp"},
    }})
    before = children()
    with pytest.raises(ToolServerStartError) as info:
        async with ToolHub(config):
            pytest.fail("the hub must not start")
    message = str(info.value)
    assert "MCP server 'missing' did not start: command not found" in message
    assert "MCP server 'exits' did not start" in message
    assert "MCP server 'web' did not start" in message
    assert "'good'" not in message
    assert children() == before  # the server that did start was stopped


async def test_server_that_never_answers_is_a_start_timeout() -> None:
    config = parse_config({"mcpServers": {"mute": {
        "command": sys.executable, "args": ["-c", "import time; time.sleep(60)"]}}})
    started = time.monotonic()
    with pytest.raises(ToolServerStartError, match=r"'mute' did not start: .*within 1 s"):
        async with ToolHub(config, start_timeout=1):
            pytest.fail("the hub must not start")
    assert time.monotonic() - started < 10


async def test_crash_mid_call_is_a_tool_error_and_the_server_restarts() -> None:
    config = parse_config({"mcpServers": {"t": TEST_SERVER | {"timeoutSeconds": 30}}})
    async with ToolHub(config, restart_delay=0.05) as hub:
        first_pid = await hub.call("t__pid")
        assert hub.starts("t") == 1
        with pytest.raises(ToolError, match=r"MCP server 't' stopped during the call of "
                                            r"'t__crash'; it is being restarted"):
            await hub.call("t__crash")
        # The next call waits for the restart and reaches a new process.
        second_pid = await hub.call("t__pid")
        assert second_pid != first_pid and not psutil.pid_exists(first_pid["result"])
        assert hub.starts("t") == 2
        assert await hub.call("t__echo", {"text": "back"}) == {"result": "back"}
        assert [t.name for t in hub.tools if t.server == "t"] == [
            "t__add", "t__crash", "t__echo", "t__environ", "t__fail", "t__hang", "t__look_up",
            "t__note", "t__pid", "t__touch"]


async def test_a_killed_idle_server_is_restarted() -> None:
    config = parse_config({"mcpServers": {"t": TEST_SERVER}})
    async with ToolHub(config, restart_delay=0.05) as hub:
        pid = (await hub.call("t__pid"))["result"]
        psutil.Process(pid).kill()
        # Noticed without any call: the supervisor sees the process's output end.
        await wait_until(lambda: hub.starts("t") == 2)
        new_pid = (await hub.call("t__pid"))["result"]
        assert new_pid != pid and hub.starts("t") == 2


async def test_hang_is_cut_at_the_timeout() -> None:
    config = parse_config({"mcpServers": {"t": TEST_SERVER | {"timeoutSeconds": 1}}})
    async with ToolHub(config) as hub:
        started = time.monotonic()
        with pytest.raises(ToolError, match=r"tool 't__hang' did not answer within 1 s"):
            await hub.call("t__hang")
        assert 1 <= time.monotonic() - started < 3
        # The server is still fine: no restart, the next call answers.
        assert await hub.call("t__echo", {"text": "still here"}) == {"result": "still here"}
        assert hub.starts("t") == 1


async def test_parallel_calls_run_concurrently() -> None:
    config = parse_config({"mcpServers": {"t": TEST_SERVER | {"timeoutSeconds": 1}}})
    async with ToolHub(config) as hub:
        results: list[Any] = []
        errors: list[str] = []

        async def call(name: str, args: dict[str, Any]) -> None:
            try:
                results.append(await hub.call(name, args))
            except ToolError as exc:
                errors.append(str(exc))

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(call, "t__hang", {})
            tg.start_soon(call, "t__add", {"a": 1, "b": 1})
        # Three hangs cut at 1 s each, at the same time, and an answer meanwhile.
        assert time.monotonic() - started < 2.5
        assert results == [{"sum": 2}] and len(errors) == 3


def test_defaults() -> None:
    hub = ToolHub(parse_config({"mcpServers": {}}))
    assert (hub.start_timeout, hub.restart_delay, hub.max_restart_delay) == (30, 0.5, 30)
    assert (hub.ping_seconds, hub.ping_timeout) == (15, 10)


async def test_text_content_environment_and_sanitized_names(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TG_GATEWAY_SECRET", "do-not-pass")
    config = parse_config({"mcpServers": {"t": TEST_SERVER | {"env": {"TG_GIVEN": "yes"}}}})
    async with ToolHub(config) as hub:
        assert await hub.call("t__note", {"text": "x"}) == "noted: x"  # text, not structured
        assert await hub.call("t__environ", {"name": "TG_GIVEN"}) == "yes"
        assert await hub.call("t__environ", {"name": "TG_GATEWAY_SECRET"}) == "(unset)"
        assert await hub.call("t__environ", {"name": "PATH"}) == os.environ["PATH"]
        tool = hub.get("t__look_up")
        assert tool is not None and tool.tool == "look.up"
        assert await hub.call("t__look_up", {"q": "it"}) == {"result": "found it"}
        with pytest.raises(ToolError, match=r"arguments of 't__echo' must be a JSON object"):
            await hub.call("t__echo", ["text", "x"])  # type: ignore[arg-type]


async def test_a_server_that_stops_answering_pings_is_restarted() -> None:
    config = parse_config({"mcpServers": {"t": TEST_SERVER}})
    async with ToolHub(config, restart_delay=0.05, ping_seconds=0.2, ping_timeout=0.5) as hub:
        pid = (await hub.call("t__pid"))["result"]
        psutil.Process(pid).suspend()  # alive, but answers nothing
        await wait_until(lambda: hub.starts("t") == 2, within=20)
        assert (await hub.call("t__pid"))["result"] != pid
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


async def test_restarts_back_off_while_they_fail(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    flag = tmp_path / "refuse"
    script = (f"import os, runpy, sys\nif os.path.exists({str(flag)!r}): sys.exit(3)\n"
              "runpy.run_module('tests.mcp_servers', run_name='__main__')")
    config = parse_config({"mcpServers": {"t": {
        "command": sys.executable, "args": ["-c", script], "cwd": str(ROOT),
        "timeoutSeconds": 0.5}}})
    caplog.set_level(logging.INFO, logger="turngate.tools")
    async with ToolHub(config, restart_delay=0.05, max_restart_delay=0.2) as hub:
        pid = (await hub.call("t__pid"))["result"]
        flag.touch()
        psutil.Process(pid).kill()

        def pauses() -> list[float]:
            return [float(m.group(1)) for r in caplog.records
                    if (m := re.search(r"'t' is down .*next try in ([\d.]+) s", r.getMessage()))]

        await wait_until(lambda: len(pauses()) >= 4, within=30)
        assert pauses()[:4] == [0.1, 0.2, 0.2, 0.2]
        # Down, its tools are still on offer; a call waits its timeout, then fails.
        assert "t__pid" in {t.name for t in hub.tools}
        with pytest.raises(ToolError, match=r"MCP server 't' is not running \(it is being "
                                            r"restarted\); 't__pid' was not called"):
            await hub.call("t__pid")
        flag.unlink()
        await wait_until(lambda: hub.starts("t") == 2, within=30)
        assert (await hub.call("t__pid"))["result"] != pid
