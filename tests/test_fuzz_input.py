"""Random JSON bodies and headers on the turn and append routes, on both databases.

Whatever is sent: never a 5xx; a refusal is a JSON ``{"error": {"code", "message"}}``
with no exception text, and writes nothing. The odd request that happens to be
valid is allowed to succeed (and then its stream must be clean).

Hypothesis drives a synchronous client from a worker thread while the server
runs in the test's event loop; ``@given`` wraps an inner function, so no
function-scoped fixture is reused across examples.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import Any
from urllib.parse import quote

import anyio
import anyio.from_thread
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures_server import GatewayServer, run_gateway
from tests.test_bad_input import LIMITS, assert_no_leak, client_for, snapshot

pytestmark = pytest.mark.anyio

# ~60 per route and database keeps this file well under 30 s; raise it to hunt.
EXAMPLES = int(os.environ.get("TURNGATE_FUZZ_EXAMPLES", "60"))
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_scalars = (
    st.none() | st.booleans() | st.integers() | st.text(max_size=30)
    | st.floats(allow_nan=False, allow_infinity=False)
)
any_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12,
)
ids = st.one_of(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,20}", fullmatch=True),
    st.text(max_size=80),
    st.just("x" * 65),
)
images = st.lists(
    st.one_of(
        st.just("data:image/png;base64,iVBORw0KGgo="),
        st.just("data:image/svg+xml;base64,PHN2Zy8+"),
        st.builds(lambda s: "data:image/png;base64," + s, st.text(max_size=20)),
        st.text(max_size=20),
        any_json,
    ),
    max_size=4,
)
documents = st.one_of(
    any_json,
    st.lists(st.fixed_dictionaries(
        {}, optional={"id": any_json, "title": any_json, "document_type": any_json}), max_size=3),
)
parts = st.lists(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image", "reasoning", "tool-call", "status", "x"])},
        optional={"text": any_json, "image": any_json, "toolCallId": any_json,
                  "toolName": any_json, "documents": any_json, "extra": any_json},
    ),
    max_size=3,
)
def mostly(good: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` four times in five, so most examples get past the first check."""
    # sampled_from leans toward its first element, as integers() leans toward 0.
    return st.sampled_from([True, True, True, True, False]).flatmap(
        lambda ok: good if ok else other
    )


valid_id = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,20}", fullmatch=True)
turn_fields = {
    "turn_id": mostly(valid_id, st.one_of(ids, any_json)),
    "text": mostly(st.text(max_size=40), st.one_of(any_json, st.just("w " * 600))),
}
turn_optional = {
    "images": mostly(images, any_json),
    "mentioned_documents": documents,
    "model": mostly(
        st.sampled_from(["scripted", "scripted:tokens=2", "scripted:tokens=x", "scripted:zz=1",
                         "nosuch:m", ":", "openai:", "scripted:tokens=99999999999",
                         "scripted\r\nx: y", "scripted:\x07"]),
        any_json,
    ),
}
append_fields = {
    "role": mostly(st.sampled_from(["user", "assistant"]), any_json),
    "content": mostly(st.one_of(st.text(max_size=40), parts), any_json),
}
append_optional = {"turn_id": mostly(valid_id, any_json)}


@st.composite
def shaped(draw: st.DrawFn, route: str) -> dict[str, Any]:
    """A body of the route's shape: its fields, some of them wrong, some left out."""
    required, optional = (
        (turn_fields, turn_optional) if route == "turns" else (append_fields, append_optional)
    )
    body = draw(st.fixed_dictionaries(required, optional=optional))
    dropped = draw(st.lists(st.sampled_from(sorted(body)), max_size=1)) if body else []
    extra = draw(st.dictionaries(st.text(max_size=8), any_json, max_size=2))
    return {**extra, **{k: v for k, v in body.items() if k not in dropped}}


def bodies(route: str) -> st.SearchStrategy[bytes]:
    return mostly(
        shaped(route).map(lambda b: json.dumps(b).encode()),
        st.one_of(
            any_json.map(lambda b: json.dumps(b).encode()),
            st.binary(max_size=120),
            st.sampled_from([b"", b"{", b"NaN", b'{"text": Infinity}', b"[" * 200 + b"]" * 200,
                             b'{"turn_id": "a", "text": "\\u0000"}', b'{"text": "\\udc00"}',
                             b'{"turn_id": "a", "text": "b", "x": 1e999}',
                             b'{"role": "user", "content": [{"type": "text", "text": "a", '
                             b'"n": -1e400}]}']),
        ),
    )


header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40
).map(str.strip)
content_types = mostly(
    st.sampled_from(["application/json", "application/json; charset=utf-8"]),
    st.one_of(
        st.sampled_from(["text/plain", "application/x-www-form-urlencoded",
                         "application/problem+json", "multipart/form-data; boundary=x",
                         "APPLICATION/JSON"]),
        header_text,
        st.none(),
    ),
)
extra_headers = st.dictionaries(
    st.sampled_from(["last-event-id", "x-request-id", "accept", "origin", "x-forwarded-for",
                     "content-encoding", "accept-encoding"]),
    header_text, max_size=3,
)


@st.composite
def requests(draw: st.DrawFn, route: str) -> dict[str, Any]:
    return {
        "thread": draw(mostly(st.just("own"),
                              st.sampled_from(["foreign", "missing", "random"]))),
        "random_thread": draw(st.text(min_size=1, max_size=30)),
        "auth": draw(mostly(st.just("a"), st.sampled_from(["b", "none", "junk"]))),
        "junk_auth": draw(header_text),
        "content_type": draw(content_types),
        "headers": draw(extra_headers),
        "body": draw(bodies(route)),
    }


def _check(response: httpx.Response, where: str) -> None:
    assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:300]}"
    assert_no_leak(response.text, where)
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, where
        assert isinstance(body["error"]["code"], str) and body["error"]["message"], where


def _fuzz(
    gw: GatewayServer, route: str, own: str, foreign: str, key_b: str
) -> Counter[str]:
    """Run the property in this worker thread; return how often each outcome was seen."""
    outcomes: Counter[str] = Counter()
    client = httpx.Client(base_url=gw.url, timeout=30)

    def rows() -> dict[str, Any]:
        return anyio.from_thread.run(snapshot, gw.store)

    def settle(thread: str) -> None:
        for _ in range(300):  # a finished turn finalizes just after its last event
            if gw.ctx.relay.running_on_thread(thread) is None:
                return
            time.sleep(0.01)

    @FUZZ_SETTINGS
    @given(req=requests(route))
    def prop(req: dict[str, Any]) -> None:
        thread = {"own": own, "foreign": foreign, "missing": "no-such-thread",
                  "random": quote(req["random_thread"], safe="")}[req["thread"]]
        headers = dict(req["headers"])
        if req["content_type"] is not None:
            headers["content-type"] = req["content_type"]
        auth = {"a": f"Bearer {gw.key}", "b": f"Bearer {key_b}", "none": None,
                "junk": req["junk_auth"]}[req["auth"]]
        if auth:
            headers["authorization"] = auth
        before = rows()
        path = f"/v1/threads/{thread}/{route}"
        with client.stream("POST", path, content=req["body"], headers=headers) as response:
            response.read()
        where = f"POST {path} {headers} {req['body'][:200]!r}"
        _check(response, where)
        outcomes[response.json()["error"]["code"] if response.status_code >= 400
                 else str(response.status_code)] += 1
        if response.status_code >= 400:
            assert rows() == before, f"{where}: rows changed on {response.status_code}"
        else:
            settle(own)

    try:
        prop()
    finally:
        client.close()
    return outcomes


@pytest.mark.parametrize("route", ["turns", "messages"])
async def test_random_bodies_and_headers_never_5xx_never_write(
    database_url: str, route: str
) -> None:
    async with run_gateway(database_url, **LIMITS) as gw:
        _, key_b = await gw.new_user("bob")
        async with gw.client() as a, client_for(gw, key_b) as b:
            own = await gw.new_thread(a)
            foreign = await gw.new_thread(b)
        started = time.monotonic()
        outcomes = await anyio.to_thread.run_sync(_fuzz, gw, route, own, foreign, key_b)
        print(f"{route}: {sum(outcomes.values())} requests: {dict(outcomes.most_common())}")
        assert sum(outcomes.values()) >= EXAMPLES
        # The examples get past auth and content type into the body checks.
        past_the_door = set(outcomes) - {"unauthorized", "unsupported_media_type",
                                         "thread_not_found", "invalid_json", "invalid_body"}
        assert len(past_the_door) >= 3, outcomes
        assert time.monotonic() - started < 45 * max(1, EXAMPLES // 60)
        # The server is still well: a good turn streams.
        async with gw.client() as a:
            r = await a.post(f"/v1/threads/{own}/turns", json={"turn_id": "after-fuzz",
                                                               "text": "ok"})
            assert r.status_code == 200 and "[DONE]" in r.text
