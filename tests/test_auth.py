"""API keys, CORS, body limits at the socket, and what never leaks (tracebacks, keys)."""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import uuid

import anyio
import httpx
import pytest

from gateway.ops.cli import main as cli_main
from gateway.ops.logs import JsonFormatter
from persistence import utcnow_text
from tests.fixtures_server import GatewayServer, run_gateway
from tests.sse_client import stream_request, validate_ui_stream
from tests.test_bad_input import assert_json_error, assert_no_leak, client_for, snapshot

pytestmark = pytest.mark.anyio

ORIGIN = "https://chat.example.com"


async def _cli(*argv: str) -> int:
    """Run the ``turngate`` command in a worker thread (it runs its own event loop)."""
    return await anyio.to_thread.run_sync(cli_main, list(argv))


async def test_cli_key_works_then_revoked_is_refused_at_once(
    gateway: GatewayServer, database_url: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    assert await _cli("keys", "create", "carol") == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"tg_[\w-]{8}_[\w-]{43}", key), key
    async with client_for(gateway, key) as carol:
        thread = await gateway.new_thread(carol)
        assert (await carol.get("/v1/threads")).status_code == 200
        # An active stream is not what authorizes the next request: revoke and retry.
        assert await _cli("keys", "revoke", key[3:11]) == 0
        r = await carol.get("/v1/threads")
        assert_json_error(r, 401, "unauthorized", "revoked key")
        assert "revoked" in r.json()["error"]["message"]
        r = await carol.post(f"/v1/threads/{thread}/turns", json={"turn_id": "t", "text": "x"})
        assert_json_error(r, 401, "unauthorized", "revoked key, turn")
        # Revoking twice says so, and the full key is accepted as the argument too.
        assert await _cli("keys", "revoke", key) == 1
    # Other keys are unaffected.
    async with gateway.client() as a:
        assert (await a.get("/v1/threads")).status_code == 200


async def test_key_prefixes_are_letters_and_digits_and_old_ones_still_revoke(
    gateway: GatewayServer, database_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A prefix starting with "-" read as an option to `keys revoke` (1 key in 64).
    keys = [(await gateway.new_user(f"p{i}"))[1] for i in range(40)]
    for key in keys:
        assert re.fullmatch(r"tg_[A-Za-z0-9]{8}_[\w-]{43}", key), key
    # A key made before that change, with "-" and "_" in its prefix, still works
    # and still revokes: after "--", or as the whole key.
    monkeypatch.setenv("DATABASE_URL", database_url)
    for prefix in ("-Ab_1x-Z", "_-q9_Tt0"):
        secret = secrets.token_urlsafe(32)
        await gateway.store._db.execute(
            "INSERT INTO api_keys (user_id, prefix, secret_hash, created_at) "
            "VALUES (:u, :p, :h, :now)",
            {"u": gateway.user_id, "p": prefix, "h": hashlib.sha256(secret.encode()).hexdigest(),
             "now": gateway.store._ts_param(utcnow_text())},
        )
        old_key = f"tg_{prefix}_{secret}"
        async with client_for(gateway, old_key) as old:
            assert (await old.get("/v1/threads")).status_code == 200
            if prefix.startswith("-"):
                assert await _cli("keys", "revoke", "--", prefix) == 0
            else:
                assert await _cli("keys", "revoke", old_key) == 0
            assert_json_error(await old.get("/v1/threads"), 401, "unauthorized", prefix)


async def test_store_revoke_and_wrong_secret_with_a_real_prefix(gateway: GatewayServer) -> None:
    _, key = await gateway.new_user("dave")
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    async with client_for(gateway, forged) as f:
        assert_json_error(await f.get("/v1/threads"), 401, "unauthorized", "forged secret")
    async with client_for(gateway, key) as d:
        assert (await d.get("/v1/threads")).status_code == 200
        assert await gateway.store.revoke_api_key(key[3:11]) is True
        assert_json_error(await d.get("/v1/threads"), 401, "unauthorized", "revoked")


async def test_keys_are_not_recoverable_from_the_database(gateway: GatewayServer) -> None:
    keys = [gateway.key] + [(await gateway.new_user(f"u{i}"))[1] for i in range(3)]
    rows = await gateway.store._db.fetch_all("SELECT * FROM api_keys")
    assert len(rows) == len(keys)
    dump = " ".join(str(v) for row in rows for v in dict(row._mapping).values())
    for key in keys:
        secret = key[12:]
        assert key not in dump and secret not in dump
        assert secret[:16] not in dump
    for row in rows:
        stored = str(row._mapping["secret_hash"])
        assert re.fullmatch(r"[0-9a-f]{64}", stored), "a SHA-256 digest, nothing else"
        assert len(str(row._mapping["prefix"])) == 8


async def test_no_key_in_any_log_line(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with run_gateway(database_url, TURNGATE_LOG_LEVEL="debug") as gw:
        _, key_b = await gw.new_user("bob")
        revoked_user, revoked = await gw.new_user("eve")
        await gw.store.revoke_api_key(revoked[3:11])
        async with gw.client() as a:
            thread = await gw.new_thread(a)
            s = await stream_request(a, "POST", f"/v1/threads/{thread}/turns",
                                     json={"turn_id": "t1", "text": "hi"})
            validate_ui_stream(s)
            s = await stream_request(
                a, "POST", f"/v1/threads/{thread}/turns",
                json={"turn_id": "t2", "text": "hi", "model": "scripted:tokens=4,fail_after=2"},
            )
            await a.post(f"/v1/threads/{thread}/messages", json={"role": "x", "content": "y"})
        for key in (key_b, revoked, gw.key[:-1] + "Z", "Bearer-ish " + gw.key):
            async with client_for(gw, key) as c:
                await c.get(f"/v1/threads/{thread}/messages")
                await c.post(f"/v1/threads/{thread}/turns", json={"turn_id": "t3", "text": "x"})
    assert caplog.records, "expected some log lines"
    fmt = JsonFormatter()
    lines = "\n".join(fmt.format(r) + r.getMessage() for r in caplog.records)
    for key in (gw.key, key_b, revoked):
        assert key not in lines
        assert key[12:] not in lines, "a key's secret part reached a log line"


async def test_cors_preflight_and_exposed_protocol_header(database_url: str) -> None:
    async with run_gateway(database_url, TURNGATE_CORS_ORIGINS=ORIGIN) as gw:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as raw, gw.client() as a:
            thread = await gw.new_thread(a)
            pre = await raw.options(
                f"/v1/threads/{thread}/turns",
                headers={"origin": ORIGIN, "access-control-request-method": "POST",
                         "access-control-request-headers": "authorization,content-type"},
            )
            assert pre.status_code == 200, pre.text
            assert pre.headers["access-control-allow-origin"] == ORIGIN
            allowed = pre.headers["access-control-allow-headers"].lower()
            assert "authorization" in allowed and "content-type" in allowed
            assert "POST" in pre.headers["access-control-allow-methods"]

            s = await stream_request(
                a, "POST", f"/v1/threads/{thread}/turns", headers={"origin": ORIGIN},
                json={"turn_id": "c1", "text": "cors ok"},
            )
            validate_ui_stream(s)
            assert s.headers["x-vercel-ai-ui-message-stream"] == "v1"
            assert s.headers["access-control-allow-origin"] == ORIGIN
            exposed = s.headers["access-control-expose-headers"].lower()
            assert "x-vercel-ai-ui-message-stream" in exposed
            # Errors are readable cross-origin too.
            r = await raw.get("/v1/threads", headers={"origin": ORIGIN})
            assert_json_error(r, 401, "unauthorized", "cors 401")
            assert r.headers["access-control-allow-origin"] == ORIGIN

            bad = await raw.options(
                "/v1/threads", headers={"origin": "https://evil.example",
                                        "access-control-request-method": "POST"},
            )
            assert bad.status_code == 400
            assert "access-control-allow-origin" not in bad.headers


async def _raw_request(url: str, head: bytes, body_chunks: list[bytes]) -> tuple[bytes, int]:
    """Send ``head`` then body chunks until the server answers; return (response, bytes sent)."""
    host, port = url.removeprefix("http://").split(":")
    sent = 0
    response = b""
    async with await anyio.connect_tcp(host, int(port)) as sock:
        await sock.send(head)
        with anyio.fail_after(10):
            for chunk in body_chunks:
                with anyio.move_on_after(0.05):
                    response += await sock.receive()
                if response:
                    break
                try:
                    await sock.send(chunk)
                except (anyio.BrokenResourceError, OSError):
                    break
                sent += len(chunk)
            while b"\r\n\r\n" not in response:
                try:
                    response += await sock.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    break
            with anyio.move_on_after(0.2):
                try:
                    while True:
                        response += await sock.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    pass
    return response, sent


def _head(gw: GatewayServer, path: str, extra: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {gw.key}\r\n"
        f"Content-Type: application/json\r\n{extra}\r\n"
    ).encode()


async def test_body_over_the_limit_is_refused_without_reading_it(database_url: str) -> None:
    limit = 65536
    async with run_gateway(database_url, TURNGATE_MAX_BODY_BYTES=str(limit)) as gw:
        async with gw.client() as a:
            thread = await gw.new_thread(a)
        path = f"/v1/threads/{thread}/turns"
        before = await snapshot(gw.store)

        # A declared length over the limit: 413 before a single body byte is sent.
        response, _ = await _raw_request(
            gw.url, _head(gw, path, "Content-Length: 1000000000\r\n"), [b""]
        )
        assert response.startswith(b"HTTP/1.1 413"), response[:200]
        assert b'"body_too_large"' in response and str(limit).encode() in response

        # Chunked, no length: refused after about the limit, long before the 10 MiB end.
        piece = b'{"turn_id": "big", "text": "' + b"x" * 16_000
        chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        response, sent = await _raw_request(
            gw.url, _head(gw, path, "Transfer-Encoding: chunked\r\n"), [chunk] * 640
        )
        assert response.startswith(b"HTTP/1.1 413"), response[:200]
        assert b'"body_too_large"' in response
        assert sent < 4 * limit, f"the server read {sent} bytes before refusing"
        print(f"chunked upload refused after {sent} bytes sent (limit {limit})")

        # The declared length is what is read: a short body is simply not JSON.
        response, _ = await _raw_request(
            gw.url, _head(gw, path, "Content-Length: 5\r\n"), [b'{"tur']
        )
        assert response.startswith(b"HTTP/1.1 400"), response[:200]
        assert b'"invalid_json"' in response
        assert await snapshot(gw.store) == before

        async with gw.client() as a:
            s = await stream_request(a, "POST", path, json={"turn_id": uuid.uuid4().hex,
                                                            "text": "fine"})
        validate_ui_stream(s)


async def test_failures_never_show_exception_text(
    gateway: GatewayServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with gateway.client() as a:
        thread = await gateway.new_thread(a)
        # An adapter failure mid-stream: an error event with a generic text.
        s = await stream_request(
            a, "POST", f"/v1/threads/{thread}/turns",
            json={"turn_id": "f1", "text": "x", "model": "scripted:tokens=5,fail_after=2"},
        )
        validate_ui_stream(s)
        raw = "\n".join(e.data for e in s.events)
        assert s.of_type("error"), raw
        assert_no_leak(raw, "failed stream")
        r = await a.get(f"/v1/threads/{thread}/turns/f1/stream")
        assert_no_leak(r.text, "replay of a failed stream")

        # A bug inside a route: 500 with a fixed message, nothing of the exception.
        async def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("secret internal detail /etc/passwd")

        monkeypatch.setattr(gateway.ctx.store, "list_threads", broken)
        r = await a.get("/v1/threads")
        body = assert_json_error(r, 500, "internal_error", "route bug")
        assert "secret" not in r.text and "RuntimeError" not in r.text
        assert body["message"] == "internal error"
