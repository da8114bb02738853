"""``turngate.testing``: what its docstrings and docs/ADAPTERS.md promise.

A live server on a fresh SQLite file (removed afterwards) or a given database,
with settings and adapters passed in; a turn read event by event; a browser
leaving after k events; a resume with ``Last-Event-ID``; waiting until the row
is final; and nothing in the kit imports test-only code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from llm_adapters import AdapterEvent, AdapterRequest, BaseAdapter, Finish, TextDelta, Usage
from tests.fixtures_db import _admin, pg_url_for
from turngate.testing import (
    Stream,
    live_server,
    open_turn,
    resume_turn,
    start_turn,
    validate_ui_stream,
    wait_final,
)

pytestmark = pytest.mark.anyio


def words(n: int) -> str:
    return "".join(f"w{i} " for i in range(1, n + 1))


async def test_fresh_sqlite_file_user_key_and_client() -> None:
    async with live_server() as server:
        assert server.url.startswith("http://127.0.0.1:")
        assert server.database_url.startswith("sqlite:///")
        path = anyio.Path(server.database_url.removeprefix("sqlite:///"))
        assert await path.is_file()
        assert str(server.client.base_url).rstrip("/") == server.url
        assert server.client.headers["authorization"] == f"Bearer {server.key}"
        r = await server.client.get("/v1/threads")
        assert r.status_code == 200, r.text
        user_id, key = await server.new_user("bob")
        async with server.new_client(key) as bob:
            assert (await bob.get("/v1/threads")).status_code == 200
        assert user_id != server.user_id
    assert not await path.exists(), "the fresh SQLite file outlived the server"
    assert not await path.parent.exists()


async def test_given_database_and_settings(database_url: str) -> None:
    env = {"TURNGATE_ON_DISCONNECT": "continue", "TURNGATE_MAX_TEXT_CHARS": "10"}
    async with live_server(database_url, env=env, user="carol") as server:
        assert server.database_url == database_url
        assert server.ctx.settings.on_disconnect == "continue"
        thread = await server.new_thread()
        _, stream = await start_turn(server.client, thread, "x" * 11)
        assert stream.status == 400 and b"10" in stream.body, stream.body


class Countdown(BaseAdapter):
    """An adapter registered through ``live_server(adapters=...)``."""

    name = "countdown"

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        super().__init__(env)
        self.start = int(self.env.get("COUNTDOWN_FROM", "3"))

    async def stream(self, request: AdapterRequest) -> AsyncGenerator[AdapterEvent, None]:
        for i in range(self.start, 0, -1):
            await anyio.lowlevel.checkpoint()
            yield TextDelta(f"{i} ")
        yield Usage("countdown", 1, self.start)
        yield Finish("stop")


async def test_adapters_are_registered_with_the_settings_environment() -> None:
    async with live_server(env={"COUNTDOWN_FROM": "4"}, adapters={"countdown": Countdown}) as s:
        _, stream = await start_turn(s.client, await s.new_thread(), "go", model="countdown")
        validate_ui_stream(stream)
        assert stream.text == "4 3 2 1 "


async def test_open_turn_reads_event_by_event_and_leaving_cancels(database_url: str) -> None:
    # The default disconnect policy (grace), with a grace shorter than the reply.
    env = {"TURNGATE_DISCONNECT_GRACE_SECONDS": "0.2"}
    async with live_server(database_url, env=env) as server:
        thread = await server.new_thread()
        async with open_turn(server.client, thread, "go",
                             model="scripted:tokens=200,delay_ms=10") as turn:
            kinds = []
            async for event in turn:
                assert event.chunk is not None
                kinds.append(event.chunk["type"])
                if len(kinds) == 4:
                    break  # leaving the block closes the connection, as a browser does
        assert kinds == ["start", "start-step", "text-start", "text-delta"]
        delivered = turn.stream.text
        final = await wait_final(server.client, thread, turn.turn_id)
        assert final.status == "cancelled"
        assert final.text.startswith(delivered) and words(200).startswith(final.text)
        assert len(final.usage) == 1 and final.usage[0]["estimated"] is True


async def test_leave_after_k_then_resume_with_last_event_id(database_url: str) -> None:
    async with live_server(database_url, env={"TURNGATE_ON_DISCONNECT": "continue"}) as server:
        thread = await server.new_thread()
        turn_id, first = await start_turn(
            server.client, thread, "go", model="scripted:tokens=40,delay_ms=5", leave_after=6)
        assert len(first.events) == 6 and not first.done
        rest = await resume_turn(server.client, thread, turn_id, first.last_id)
        # A new thread's transient title chunk has no id: not one of the turn's events.
        ids = [int(e.id or -1) for e in first.events + rest.events if not e.transient]
        assert ids == list(range(len(ids))), ids
        stitched = Stream(200, rest.headers, first.events + rest.events)
        validate_ui_stream(stitched)
        assert stitched.text == words(40)
        final = await wait_final(server.client, thread, turn_id)
        assert final.status == "complete" and final.text == words(40)
        assert len(final.usage) == 1 and final.usage[0]["estimated"] is False
        nothing = await resume_turn(server.client, thread, "no-such-turn")
        assert nothing.status == 204


async def test_wait_final_times_out_naming_the_status() -> None:
    async with live_server(env={"TURNGATE_ON_DISCONNECT": "continue"}) as server:
        thread = await server.new_thread()
        turn_id, _ = await start_turn(server.client, thread, "go",
                                      model="scripted:tokens=500,delay_ms=20", leave_after=3)
        # 1 s: long enough to read the messages back on a loaded machine, far short of
        # the turn's 10 s.
        with pytest.raises(TimeoutError, match="not final after 1.0 s \\(status 'streaming'\\)"):
            await wait_final(server.client, thread, turn_id, within=1.0)
        # A deadline that ends before the messages were read back says so, not "no row".
        with pytest.raises(TimeoutError, match="the messages were not read back in time"):
            await wait_final(server.client, thread, turn_id, within=0)
        r = await server.client.post(f"/v1/threads/{thread}/turns/{turn_id}/cancel")
        assert r.status_code == 200, r.text
        assert (await wait_final(server.client, thread, turn_id)).status == "cancelled"


async def test_postgresql_is_migrated_only_when_asked(pg_url: str) -> None:
    name = f"turngate_kit_{os.getpid()}"
    await _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    await _admin(f"CREATE DATABASE {name}")
    try:
        with pytest.raises(RuntimeError, match="stopped during start-up"):
            async with live_server(pg_url_for(name)):
                raise AssertionError("served an empty PostgreSQL database")
        async with live_server(pg_url_for(name), migrate_database=True) as server:
            assert (await server.client.get("/readyz")).status_code == 200
    finally:
        await _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def test_a_server_that_cannot_start_says_so(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/missing-dir/turngate.db"
    with pytest.raises(RuntimeError, match="stopped during start-up"):
        async with live_server(url):
            raise AssertionError("the server started on an impossible database path")


async def test_an_error_in_the_block_comes_out_as_it_is() -> None:
    with pytest.raises(ZeroDivisionError):
        async with live_server():
            raise ZeroDivisionError("the caller's own failure, not an exception group")


def test_the_kit_imports_no_test_only_code() -> None:
    code = (
        "import sys, turngate.testing, turngate.testing.conformance\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tests', 'pytest', '_pytest')]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60, env={**os.environ, "PYTHONPATH": ""})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_package_docstring_example_runs_as_a_plain_script(tmp_path: Path) -> None:
    import textwrap

    import turngate.testing

    doc = turngate.testing.__doc__ or ""
    example = textwrap.dedent(doc.split("::\n")[1].split("\nNothing here")[0])
    imports, _, body = example.partition("\n\n")
    script = (
        f"import anyio\n{imports}\n\nasync def main() -> None:\n"
        + textwrap.indent(body, "    ")
        + "\n    assert final.status == 'complete' and len(final.usage) == 1, final\n"
        + "    print('ok', first.last_id, len(rest.events), final.text.count(' '))\n"
        + "\nanyio.run(main, backend='asyncio')\n"
    )
    (tmp_path / "script.py").write_text(script)
    result = subprocess.run([sys.executable, str(tmp_path / "script.py")], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, script + result.stdout + result.stderr
    # 58 events: start, start-step, text-start, 50 deltas, text-end, finish-step,
    # message-metadata, finish, [DONE]; the first 5 read, the rest resumed after id 4.
    assert result.stdout.split() == ["ok", "4", str(58 - 5), "50"], result.stdout
