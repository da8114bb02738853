"""Bad requests on every route, on both databases: a 4xx JSON error, nothing written.

One table drives it. Each case runs against a real gateway holding two users
(A owns a thread with one finished turn, B owns another); after every case the
rows of users, api_keys, threads, messages and token_usage are compared with
the snapshot taken before it. A good turn must still stream at the end.
"""

from __future__ import annotations

import base64
import logging
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest

from persistence import Store
from tests.fixtures_server import GatewayServer, run_gateway
from tests.sse_client import stream_request, validate_ui_stream

pytestmark = pytest.mark.anyio

TABLES = ("users", "api_keys", "threads", "messages", "token_usage")

# Small limits keep the oversized payloads small.
LIMITS = {
    "TURNGATE_MAX_TEXT_CHARS": "1000",
    "TURNGATE_MAX_ID_CHARS": "64",
    "TURNGATE_MAX_IMAGES": "2",
    "TURNGATE_MAX_IMAGE_BYTES": "1024",
    "TURNGATE_MAX_BODY_BYTES": "65536",
}

# What must never reach a client: tracebacks, exception names, driver names.
_LEAK_RE = re.compile(
    r"Traceback|File \"|\b[A-Z]\w*(Error|Exception)\b|asyncpg|sqlite3|aiosqlite|sqlalchemy"
)


async def snapshot(store: Store) -> dict[str, Any]:
    """Row counts of every table, and the identity and version of each thread and message."""
    db = store._db  # the test reads the server's own database through its store
    out: dict[str, Any] = {}
    for table in TABLES:
        out[table] = int(await db.fetch_val(f"SELECT count(*) FROM {table}"))
    out["thread_rows"] = [
        tuple(r) for r in await db.fetch_all(
            "SELECT id, owner_id, title, updated_at FROM threads ORDER BY id")
    ]
    out["message_rows"] = [
        tuple(r) for r in await db.fetch_all(
            "SELECT id, thread_id, role, status, updated_at FROM messages ORDER BY id")
    ]
    out["revoked"] = int(
        await db.fetch_val("SELECT count(*) FROM api_keys WHERE revoked_at IS NOT NULL")
    )
    return out


def assert_no_leak(text: str, where: str = "") -> None:
    """No traceback, exception name or driver name in a response or stream."""
    match = _LEAK_RE.search(text)
    assert match is None, f"{where}: leaks {match.group(0)!r} in {text[:300]!r}"


def assert_json_error(response: httpx.Response, status: int, code: str, where: str = "") -> dict:
    """A JSON body ``{"error": {"code", "message"}}`` with the expected status and code.

    On the AI SDK routes (``/api/...``) the same error is a plain-text sentence with
    the code in ``x-turngate-error-code`` (useChat shows the body as the message).
    """
    assert response.status_code == status, f"{where}: {response.status_code} {response.text[:300]}"
    request = getattr(response, "_request", None)
    if request is not None and request.url.path.startswith("/api/"):
        assert response.headers.get("content-type", "").startswith("text/plain"), where
        assert response.headers.get("x-turngate-error-code") == code, where
        text = response.text
        assert text[:1].isupper() and text.endswith(".") and not text.startswith("{"), where
        assert_no_leak(text, where)
        return {"code": code, "message": text}
    assert response.headers.get("content-type", "").startswith("application/json"), where
    body = response.json()
    assert set(body) == {"error"}, f"{where}: {body}"
    assert set(body["error"]) == {"code", "message"}, f"{where}: {body}"
    assert body["error"]["code"] == code, f"{where}: {body}"
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], where
    assert_no_leak(response.text, where)
    return body["error"]  # type: ignore[no-any-return]


def client_for(gw: GatewayServer, key: str) -> httpx.AsyncClient:
    """A client of the gateway that sends ``key`` (``gw.client()`` always sends A's)."""
    return httpx.AsyncClient(base_url=gw.url, headers=gw.auth(key), timeout=30)


def data_url(n_bytes: int, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(b"\x89PNG" + b"x" * (n_bytes - 4)).decode()


SVG = "data:image/svg+xml;base64," + base64.b64encode(
    b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>").decode()


def server_failures(records: list[logging.LogRecord]) -> list[str]:
    """Log records of request handling that report a server error or carry a traceback."""
    return [
        f"{r.name} {r.levelname} {r.getMessage()[:200]}"
        for r in records
        if (r.name.startswith("uvicorn") or r.name.startswith("turngate"))
        and (r.exc_info is not None or r.levelno >= logging.ERROR)
    ]


@dataclass
class Case:
    name: str
    method: str
    path: str
    status: int
    code: str
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] | None = None
    auth: str = "a"  # "a" (user A's key), "none", or a literal Authorization header
    says: str | None = None  # a text the message must contain (the bad value, the rule)


def _turn(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"turn_id": uuid.uuid4().hex, "text": "hello"}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not ...}


T = "/v1/threads/{own}/turns"
M = "/v1/threads/{own}/messages"
JSON_CT = {"content-type": "application/json"}

CASES: list[Case] = [
    # --- authentication, on several routes
    Case("no key: create thread", "POST", "/v1/threads", 401, "unauthorized", json={},
         auth="none"),
    Case("no key: list threads", "GET", "/v1/threads", 401, "unauthorized", auth="none"),
    Case("unknown key: turn", "POST", T, 401, "unauthorized", json=_turn(),
         auth="Bearer tg_AAAAAAAA_" + "A" * 43),
    Case("malformed key: usage", "GET", "/v1/usage", 401, "unauthorized", auth="Bearer nope"),
    Case("basic scheme: messages", "GET", M, 401, "unauthorized", auth="Basic dXNlcjpwdw=="),
    Case("bearer without key: cancel", "POST", "/v1/threads/{own}/turns/{turn}/cancel", 401,
         "unauthorized", auth="Bearer"),
    # --- POST /v1/threads
    Case("create: text/plain", "POST", "/v1/threads", 415, "unsupported_media_type",
         content=b"{}", headers={"content-type": "text/plain"}, says="text/plain"),
    Case("create: no content type", "POST", "/v1/threads", 415, "unsupported_media_type",
         content=b"{}"),
    Case("create: not JSON", "POST", "/v1/threads", 400, "invalid_json", content=b"{nope",
         headers=JSON_CT, says="{nope"),
    Case("create: array body", "POST", "/v1/threads", 400, "invalid_body", json=[1, 2],
         says="array"),
    Case("create: id is a number", "POST", "/v1/threads", 400, "invalid_id", json={"id": 7}),
    Case("create: id with a space", "POST", "/v1/threads", 400, "invalid_id",
         json={"id": "a b"}, says="'a b'"),
    Case("create: id too long", "POST", "/v1/threads", 400, "invalid_id",
         json={"id": "x" * 65}, says="1..64"),
    Case("create: title is a list", "POST", "/v1/threads", 400, "invalid_title",
         json={"title": ["t"]}),
    Case("create: B's thread id", "POST", "/v1/threads", 409, "thread_id_taken",
         json={"id": "{foreign}"}),
    Case("create: body over 64 KiB", "POST", "/v1/threads", 413, "body_too_large",
         json={"title": "t" * 70_000}),
    Case("create: NaN", "POST", "/v1/threads", 400, "invalid_json", content=b'{"title": NaN}',
         headers=JSON_CT),
    Case("create: NUL in title", "POST", "/v1/threads", 400, "invalid_json",
         json={"title": "a\x00b"}),
    Case("create: nested 1000 deep", "POST", "/v1/threads", 400, "invalid_json",
         content=b"[" * 1000 + b"]" * 1000, headers=JSON_CT),
    # --- GET /v1/threads
    Case("list: limit 0", "GET", "/v1/threads", 400, "invalid_limit", params={"limit": "0"},
         says="'0'"),
    Case("list: limit not a number", "GET", "/v1/threads", 400, "invalid_limit",
         params={"limit": "ten"}),
    Case("list: limit superscript two", "GET", "/v1/threads", 400, "invalid_limit",
         params={"limit": "\u00b2"}),
    Case("list: garbage cursor", "GET", "/v1/threads", 400, "invalid_cursor",
         params={"before": "zzzz"}, says="zzzz"),
    # --- GET /v1/threads/{id}/messages
    Case("messages: unknown thread", "GET", "/v1/threads/{missing}/messages", 404,
         "thread_not_found"),
    Case("messages: B's thread", "GET", "/v1/threads/{foreign}/messages", 404,
         "thread_not_found"),
    Case("messages: bad thread id shape", "GET", "/v1/threads/-bad%20id/messages", 404,
         "thread_not_found"),
    Case("messages: bad format", "GET", M, 400, "invalid_format", params={"format": "xml"},
         says="'xml'"),
    # --- POST /v1/threads/{id}/messages (legacy append)
    Case("append: role system", "POST", M, 400, "invalid_role",
         json={"role": "system", "content": "x"}, says="'system'"),
    Case("append: missing content", "POST", M, 400, "missing_content", json={"role": "user"}),
    Case("append: content a number", "POST", M, 400, "invalid_content",
         json={"role": "user", "content": 5}),
    Case("append: unknown part type", "POST", M, 400, "invalid_content",
         json={"role": "user", "content": [{"type": "usage", "tokens": 9}]}, says="usage"),
    Case("append: text part not a string", "POST", M, 400, "invalid_content",
         json={"role": "user", "content": [{"type": "text", "text": 5}]}),
    Case("append: image not a data URL", "POST", M, 400, "invalid_image",
         json={"role": "user", "content": [{"type": "image", "image": "http://x/y.png"}]}),
    Case("append: turn_id a list", "POST", M, 400, "invalid_turn_id",
         json={"role": "user", "content": "x", "turn_id": ["a"]}),
    Case("append: text too long", "POST", M, 400, "text_too_long",
         json={"role": "user", "content": "x" * 1001}, says="1000"),
    Case("append: B's thread", "POST", "/v1/threads/{foreign}/messages", 404,
         "thread_not_found", json={"role": "user", "content": "x", "turn_id": "t1"}),
    Case("append: form encoded", "POST", M, 415, "unsupported_media_type",
         content=b"role=user", headers={"content-type": "application/x-www-form-urlencoded"}),
    Case("append: surrogate", "POST", M, 400, "invalid_json",
         content=b'{"role": "user", "content": "\\ud800"}', headers=JSON_CT),
    Case("append: 1e999 in a part", "POST", M, 400, "invalid_json",
         content=b'{"role": "user", "content": [{"type": "text", "text": "x", "n": 1e999}]}',
         headers=JSON_CT, says="1e999"),
    Case("append: -1e999 as a turn_id", "POST", M, 400, "invalid_json",
         content=b'{"role": "user", "content": "x", "turn_id": -1e999}', headers=JSON_CT,
         says="-1e999"),
    Case("append: extra key in a text part", "POST", M, 400, "invalid_content",
         json={"role": "user", "content": [{"type": "text", "text": "x", "admin": True}]},
         says="'admin'"),
    Case("append: text part without text", "POST", M, 400, "invalid_content",
         json={"role": "user", "content": [{"type": "text"}]}, says="'text'"),
    Case("append: extra key in an image part", "POST", M, 400, "invalid_content",
         json={"role": "user", "content": [
             {"type": "image", "image": "data:image/png;base64,iVBORw0KGgo=", "url": "x"}]},
         says="'url'"),
    Case("append: extra key in a document", "POST", M, 400, "invalid_content",
         json={"role": "user", "content": [{"type": "mentioned-documents", "documents": [
             {"id": "d", "title": "t", "document_type": "pdf", "html": "<b>"}]}]},
         says="html"),
    Case("append: extra key in a tool call", "POST", M, 400, "invalid_content",
         json={"role": "assistant", "content": [
             {"type": "tool-call", "toolCallId": "c", "toolName": "n", "eval": "x"}]},
         says="'eval'"),
    Case("append: reasoning from the user", "POST", M, 400, "invalid_content",
         json={"role": "user", "content": [{"type": "reasoning", "text": "x"}]},
         says="reasoning"),
    Case("append: status part of made-up text", "POST", M, 400, "invalid_content",
         json={"role": "assistant", "content": [{"type": "status", "text": "approved"}]},
         says="'approved'"),
    Case("append: type not a string", "POST", M, 400, "invalid_content",
         json={"role": "user", "content": [{"type": ["text"], "text": "x"}]}),
    Case("append: SVG image part", "POST", M, 400, "invalid_image",
         json={"role": "user", "content": [{"type": "image", "image": SVG}]},
         says="image/svg+xml"),
    # --- POST /v1/threads/{id}/turns
    Case("turn: missing turn_id", "POST", T, 400, "missing_turn_id", json=_turn(turn_id=...)),
    Case("turn: missing text", "POST", T, 400, "missing_text", json=_turn(text=...)),
    Case("turn: text a number", "POST", T, 400, "invalid_text", json=_turn(text=3),
         says="number"),
    Case("turn: turn_id null", "POST", T, 400, "invalid_turn_id", json=_turn(turn_id=None)),
    Case("turn: turn_id with a slash", "POST", T, 400, "invalid_turn_id",
         json=_turn(turn_id="a/b"), says="'a/b'"),
    Case("turn: turn_id too long", "POST", T, 400, "invalid_turn_id",
         json=_turn(turn_id="t" * 65)),
    Case("turn: text too long", "POST", T, 400, "text_too_long", json=_turn(text="w " * 501),
         says="1000"),
    Case("turn: images an object", "POST", T, 400, "invalid_images",
         json=_turn(images={"a": 1})),
    Case("turn: too many images", "POST", T, 400, "too_many_images",
         json=_turn(images=[data_url(10)] * 3), says="3 images"),
    Case("turn: image http URL", "POST", T, 400, "invalid_image",
         json=_turn(images=["https://example.com/a.png"]), says="data:image"),
    Case("turn: image not image/*", "POST", T, 400, "invalid_image",
         json=_turn(images=[data_url(10, "text/plain")])),
    Case("turn: image bad base64", "POST", T, 400, "invalid_image",
         json=_turn(images=["data:image/png;base64,@@@@"]), says="base64"),
    Case("turn: image too large", "POST", T, 413, "image_too_large",
         json=_turn(images=[data_url(2000)]), says="1024"),
    Case("turn: image a number", "POST", T, 400, "invalid_image", json=_turn(images=[1])),
    Case("turn: empty text, no image", "POST", T, 400, "empty_text", json=_turn(text=""),
         says="expected some text or at least one image"),
    Case("turn: whitespace text, no image", "POST", T, 400, "empty_text",
         json=_turn(text=" \n\t "), says="' \\n\\t '"),
    Case("turn: SVG image", "POST", T, 400, "invalid_image", json=_turn(images=[SVG]),
         says="image/svg+xml"),
    Case("turn: SVG declared as PNG", "POST", T, 400, "invalid_image",
         json=_turn(images=["data:image/png;base64," + base64.b64encode(
             b"<svg xmlns='http://www.w3.org/2000/svg'/>").decode()]), says="PNG"),
    Case("turn: image/x-icon", "POST", T, 400, "invalid_image",
         json=_turn(images=[data_url(10, "image/x-icon")]), says="image/png"),
    Case("turn: 1e999 in documents", "POST", T, 400, "invalid_json",
         content=b'{"turn_id": "a", "text": "b", "mentioned_documents": [{"id": 1e999}]}',
         headers=JSON_CT, says="1e999"),
    Case("turn: model with CR/LF", "POST", T, 400, "invalid_model",
         json=_turn(model="scripted\r\nx-injected: 1"), says="\\r\\n"),
    Case("turn: model with a tab", "POST", T, 400, "invalid_model",
         json=_turn(model="scripted:\ttokens=2"), says="control characters"),
    Case("chat: whitespace text", "POST", "/api/chat", 400, "empty_text",
         json={"id": "{missing}", "messages": [
             {"id": "m1", "role": "user", "parts": [{"type": "text", "text": "  "}]}]}),
    # --- headers
    Case("authorization of 2 KiB", "GET", "/v1/threads", 401, "unauthorized",
         auth="Bearer " + "A" * 2048, says="2055 bytes"),
    Case("too many headers", "GET", "/v1/threads", 431, "too_many_headers",
         headers={f"x-filler-{i}": "1" for i in range(150)}, says="100"),
    Case("turn: documents an object", "POST", T, 400, "invalid_mentioned_documents",
         json=_turn(mentioned_documents={"id": 1})),
    Case("turn: documents of strings", "POST", T, 400, "invalid_mentioned_documents",
         json=_turn(mentioned_documents=["doc"]), says="'doc'"),
    Case("turn: model a number", "POST", T, 400, "invalid_model", json=_turn(model=5)),
    Case("turn: model empty", "POST", T, 400, "invalid_model", json=_turn(model=" ")),
    Case("turn: unknown adapter", "POST", T, 400, "unknown_adapter",
         json=_turn(model="nosuch:x"), says="nosuch"),
    Case("turn: bad scripted options", "POST", T, 400, "invalid_model",
         json=_turn(model="scripted:tokens=abc")),
    Case("turn: unknown thread", "POST", "/v1/threads/{missing}/turns", 404,
         "thread_not_found", json=_turn()),
    Case("turn: B's thread", "POST", "/v1/threads/{foreign}/turns", 404, "thread_not_found",
         json=_turn()),
    Case("turn: thread id too long", "POST", "/v1/threads/" + "a" * 65 + "/turns", 404,
         "thread_not_found", json=_turn()),
    Case("turn: body over the limit", "POST", T, 413, "body_too_large",
         json=_turn(text="x" * 70_000), says="65536"),
    Case("turn: text/plain", "POST", T, 415, "unsupported_media_type",
         content=b'{"turn_id": "a", "text": "b"}', headers={"content-type": "text/plain"}),
    Case("turn: not JSON", "POST", T, 400, "invalid_json", content=b'{"turn_id": ',
         headers=JSON_CT),
    Case("turn: null body", "POST", T, 400, "invalid_body", content=b"null", headers=JSON_CT),
    Case("turn: bad UTF-8", "POST", T, 400, "invalid_json", content=b'{"text": "\xff"}',
         headers=JSON_CT),
    # --- GET /v1/threads/{id}/turns/{turn_id}/stream
    Case("resume: B's thread", "GET", "/v1/threads/{foreign}/turns/{turn}/stream", 404,
         "thread_not_found"),
    Case("resume: unknown thread", "GET", "/v1/threads/{missing}/turns/{turn}/stream", 404,
         "thread_not_found"),
    Case("resume: bad turn id", "GET", "/v1/threads/{own}/turns/a%20b/stream", 400,
         "invalid_turn_id"),
    Case("resume: Last-Event-ID not a number", "GET", "/v1/threads/{own}/turns/{turn}/stream",
         400, "invalid_last_event_id", headers={"last-event-id": "abc"}, says="'abc'"),
    # --- POST /v1/threads/{id}/turns/{turn_id}/cancel
    Case("cancel: B's thread", "POST", "/v1/threads/{foreign}/turns/{turn}/cancel", 404,
         "thread_not_found"),
    Case("cancel: unknown turn", "POST", "/v1/threads/{own}/turns/nosuchturn/cancel", 404,
         "turn_not_found"),
    # --- GET /v1/usage
    Case("usage: B's thread", "GET", "/v1/usage", 404, "thread_not_found",
         params={"thread_id": "{foreign}"}),
    Case("usage: bad thread id shape", "GET", "/v1/usage", 404, "thread_not_found",
         params={"thread_id": "../x"}),
    Case("usage: limit too big", "GET", "/v1/usage", 400, "invalid_limit",
         params={"limit": "100000"}),
    Case("usage: garbage cursor", "GET", "/v1/usage", 400, "invalid_cursor",
         params={"before": "!!"}),
    # --- routing
    Case("method not allowed", "DELETE", "/v1/threads", 405, "method_not_allowed"),
    Case("unknown route", "GET", "/v1/nothing-here", 404, "not_found"),
]


@dataclass
class World:
    gw: GatewayServer
    own: str
    foreign: str
    turn: str
    key_b: str

    def fill(self, text: str) -> str:
        return text.format(own=self.own, foreign=self.foreign, turn=self.turn,
                           missing="no-such-thread-" + uuid.uuid4().hex[:8])


@pytest.fixture
async def world(database_url: str) -> AsyncIterator[World]:
    """A gateway with small limits; A owns a thread with one finished turn, B owns one."""
    async with run_gateway(database_url, **LIMITS) as gw:
        _, key_b = await gw.new_user("bob")
        async with gw.client() as a, client_for(gw, key_b) as b:
            own = await gw.new_thread(a)
            foreign = await gw.new_thread(b)
            turn = "done-turn"
            s = await stream_request(a, "POST", f"/v1/threads/{own}/turns",
                                     json={"turn_id": turn, "text": "one two"})
            validate_ui_stream(s)
        yield World(gw, own, foreign, turn, key_b)


def _fill_json(world: World, value: Any) -> Any:
    if isinstance(value, str):
        return world.fill(value) if "{" in value and "}" in value and len(value) < 40 else value
    if isinstance(value, dict):
        return {k: _fill_json(world, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill_json(world, v) for v in value]
    return value


async def send_case(world: World, client: httpx.AsyncClient, case: Case) -> httpx.Response:
    headers = dict(case.headers)
    if case.auth == "a":
        headers["authorization"] = f"Bearer {world.gw.key}"
    elif case.auth != "none":
        headers["authorization"] = case.auth
    params = {k: world.fill(v) for k, v in (case.params or {}).items()}
    kwargs: dict[str, Any] = {"headers": headers, "params": params}
    if case.json is not None:
        kwargs["json"] = _fill_json(world, case.json)
    elif case.content is not None:
        kwargs["content"] = case.content
    return await client.request(case.method, world.fill(case.path), **kwargs)


def test_the_table_is_big_and_distinct() -> None:
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)
    routes = {(c.method, re.sub(r"\{\w+\}", "X", c.path)) for c in CASES}
    assert len(routes) >= 9


async def test_bad_requests_write_nothing_and_a_good_turn_still_streams(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    store = world.gw.store
    failures: list[str] = []
    async with httpx.AsyncClient(base_url=world.gw.url, timeout=30) as client:
        for case in CASES:
            before = await snapshot(store)
            r = await send_case(world, client, case)
            try:
                error = assert_json_error(r, case.status, case.code, case.name)
                if case.says is not None:
                    assert case.says in error["message"], f"{case.name}: {error['message']!r}"
                if case.status == 401:
                    assert r.headers.get("www-authenticate", "").startswith("Bearer"), case.name
                after = await snapshot(store)
                assert after == before, f"{case.name}: rows changed"
            except AssertionError as exc:
                failures.append(str(exc))
        assert not failures, "\n".join(failures)
        assert server_failures(caplog.records) == []

        before = await snapshot(store)
        good = await stream_request(
            client, "POST", f"/v1/threads/{world.own}/turns",
            headers=world.gw.auth(), json={"turn_id": uuid.uuid4().hex, "text": "still fine"},
        )
    validate_ui_stream(good)
    assert good.text == "still fine "
    after = await snapshot(store)
    assert after["messages"] == before["messages"] + 2
    assert after["token_usage"] == before["token_usage"] + 1


async def test_huge_and_countless_headers_are_refused_before_any_route(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A 16 MiB Authorization and 20,000 header fields: 431 JSON at once, nothing written,
    and the key is never looked up (no database statement for it)."""
    caplog.set_level(logging.INFO)
    store = world.gw.store
    before = await snapshot(store)
    huge_auth = b"authorization: Bearer " + b"A" * (16 * 1024 * 1024) + b"\r\n"
    auth = f"authorization: Bearer {world.gw.key}\r\n".encode()
    path = world.fill(M)
    # Raw bytes: httpx takes many seconds to prepare such requests, the server under one.
    r = await raw_post(world.gw.url, path, huge_auth, b'{"role": "user", "content": "x"}')
    error = assert_json_error(r, 431, "headers_too_large", "16 MiB authorization")
    assert "'authorization'" in error["message"] and "32768" in error["message"], error
    many = b"".join(f"x-h{i}: 1\r\n".encode() for i in range(20_000))
    r = await raw_post(world.gw.url, path, auth + many, b'{"role": "user", "content": "x"}')
    error = assert_json_error(r, 431, "too_many_headers", "20,000 headers")
    count = re.search(r"has (\d+) header fields", error["message"])
    assert count is not None and int(count.group(1)) > 20_000, error
    assert await snapshot(store) == before
    assert server_failures(caplog.records) == []
    async with world.gw.client() as client:  # and the server is fine
        assert (await client.get(path)).status_code == 200


async def test_client_leaving_mid_body_is_logged_as_the_clients(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A disconnect while the body is read: one INFO line, no error, no traceback."""
    caplog.set_level(logging.DEBUG)
    store = world.gw.store
    before = await snapshot(store)
    host, port = world.gw.url.removeprefix("http://").split(":")
    for route in (M, T):
        head = (
            f"POST {world.fill(route)} HTTP/1.1\r\nhost: {host}\r\n"
            f"authorization: Bearer {world.gw.key}\r\ncontent-type: application/json\r\n"
            "content-length: 1000\r\n\r\n"
        ).encode()
        stream = await anyio.connect_tcp(host, int(port))
        await stream.send(head + b'{"role": "user", "content": "half')
        with anyio.fail_after(10):  # the body is being waited for: leave now
            while not _body_read_started(world):
                await anyio.sleep(0.01)
        await stream.aclose()
        with anyio.fail_after(10):
            while len(_disconnect_lines(caplog)) < (1 if route == M else 2):
                await anyio.sleep(0.01)
    lines = _disconnect_lines(caplog)
    assert len(lines) == 2, lines
    assert all(r.levelno == logging.INFO and r.exc_info is None for r in lines)
    assert server_failures(caplog.records) == []
    assert not [r for r in caplog.records if "ClientDisconnect" in r.getMessage()]
    assert await snapshot(store) == before


async def raw_post(url: str, path: str, header_lines: bytes, body: bytes) -> httpx.Response:
    """POST over a plain socket; the answer read to the end of the connection."""
    host, port = url.removeprefix("http://").split(":")
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n"
    ).encode()
    async with await anyio.connect_tcp(host, int(port)) as stream:
        await stream.send(head + header_lines + b"\r\n" + body)
        received = b""
        with anyio.fail_after(30):
            try:
                while chunk := await stream.receive():
                    received += chunk
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
    status_line, _, rest = received.partition(b"\r\n")
    raw_headers, _, content = rest.partition(b"\r\n\r\n")
    headers = [tuple(line.decode("latin-1").split(": ", 1)) for line in raw_headers.split(b"\r\n")]
    return httpx.Response(int(status_line.split()[1]), headers=headers, content=content)


def _disconnect_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("client_disconnected")]


def _body_read_started(world: World) -> bool:
    # The server's connections: one of them is inside a request whose body is awaited.
    server = world.gw.server
    return any(
        getattr(getattr(conn, "cycle", None), "more_body", False)
        for conn in server.server_state.connections
    )
