"""The incremental SSE parser used by the HTTP adapters, and the price table."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_adapters._sse import SSEDecoder, SSEEvent, aiter_sse
from llm_adapters.pricing import PriceTable
from tests.stream_corpus import FIXTURES, RECORDINGS
from tests.upstream_fakes import (
    FIXTURES_DIR,
    RECORDINGS_DIR,
    recording,
    recordings_in_use,
    recordings_present,
    split_events,
)
from turngate.exceptions import UpstreamProtocolError


def parse(*chunks: bytes) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events = [e for c in chunks for e in decoder.feed(c)]
    return events + decoder.flush()


def test_fields_comments_and_multiline_data() -> None:
    body = (
        b": a comment\n"
        b"event: greet\n"
        b"data: one\n"
        b"data:two\n"
        b"data\n"
        b"id: 7\n"
        b"retry: 100\n"
        b"unknown: x\n"
        b"\n"
        b"data: plain\n\n"
        b"event: no-data\n\n"
        b"data: after\n\n"
    )
    decoder = SSEDecoder()
    events = decoder.feed(body) + decoder.flush()
    assert events == [
        SSEEvent("greet", "one\ntwo\n"),
        SSEEvent("message", "plain"),
        SSEEvent("message", "after"),  # an event with no data is not dispatched
    ]
    assert decoder.last_event_id == "7" and decoder.retry_ms == 100


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_line_endings_split_anywhere(newline: bytes) -> None:
    body = b"event: e\ndata: caf\xc3\xa9 \xf0\x9f\x98\x8a\n\ndata: x\n\n".replace(b"\n", newline)
    expected = [SSEEvent("e", "café 😊"), SSEEvent("message", "x")]
    assert parse(body) == expected
    for cut in range(1, len(body)):
        assert parse(body[:cut], body[cut:]) == expected, cut
    assert parse(*[body[i : i + 1] for i in range(len(body))]) == expected


def test_bom_is_dropped_even_when_split() -> None:
    assert parse(b"\xef\xbb", b"\xbfdata: a\n\n") == [SSEEvent("message", "a")]


def test_last_event_without_blank_line_is_dispatched_at_eof() -> None:
    assert parse(b"data: a\n\nevent: last\ndata: b") == [
        SSEEvent("message", "a"),
        SSEEvent("last", "b"),
    ]
    assert parse(b"data: a\n\ndata: b\r") == [SSEEvent("message", "a"), SSEEvent("message", "b")]
    assert parse(b"data: a\n\n: trailing comment") == [SSEEvent("message", "a")]


def test_oversized_event_is_a_protocol_error() -> None:
    decoder = SSEDecoder(max_event_bytes=100)
    with pytest.raises(UpstreamProtocolError):
        decoder.feed(b"data: " + b"x" * 200)


def stream_bodies() -> list[object]:
    """Every project fixture; and every recording when they are in use (all the files
    in the folder, or the known names when it is required but missing, so that those
    fail)."""
    params = [pytest.param(path, id=f"fixture:{path.name}")
              for path in sorted(FIXTURES_DIR.glob("*.sse"))]
    if recordings_in_use():
        paths = (sorted(RECORDINGS_DIR.glob("*.sse")) if recordings_present()
                 else [RECORDINGS_DIR / c.file for c in RECORDINGS])
        params += [pytest.param(path, id=f"recording:{path.name}") for path in paths]
    return params


@pytest.mark.parametrize("path", stream_bodies())
def test_every_stream_parses_the_same_whole_or_byte_by_byte(path: Path) -> None:
    body = recording(path.name) if path.parent == RECORDINGS_DIR else path.read_bytes()
    whole = parse(body)
    assert whole, "at least one event"
    assert parse(*[body[i : i + 1] for i in range(len(body))]) == whole
    assert b"".join(split_events(body)) == body
    assert not any(e.data.startswith(":") for e in whole)


def test_every_fixture_has_its_oracle() -> None:
    """A stream file without expected results would be replayed by nothing."""
    assert sorted(p.name for p in FIXTURES_DIR.glob("*.sse")) == sorted(c.file for c in FIXTURES)


@pytest.mark.anyio
async def test_aiter_sse() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for piece in (b"da", b"ta: 1\n", b"\ndata: 2"):
            yield piece

    assert [e async for e in aiter_sse(chunks())] == [
        SSEEvent("message", "1"),
        SSEEvent("message", "2"),
    ]


# --- pricing -------------------------------------------------------------------------


def test_cost_micros_exact_and_longest_prefix() -> None:
    table = PriceTable({"gpt-4o-mini": {"input": 0.15, "output": 0.6}}, include_defaults=False)
    assert table.cost_micros("gpt-4o-mini", 1_000_000, 0) == 150_000
    assert table.cost_micros("gpt-4o-mini", 10, 10) == 8  # 1.5 + 6 = 7.5 -> 8 (half up)
    assert table.cost_micros("gpt-4o-mini-2024-07-18", 1000, 1000) == 750
    table = PriceTable()
    assert table.price("gpt-4o-2024-08-06") == table.price("gpt-4o")
    assert table.price("gpt-4o-mini-2024-07-18") == table.price("gpt-4o-mini")
    assert table.price("openai:gpt-4o-mini") == table.price("gpt-4o-mini")
    assert table.price("claude-sonnet-4-5-20250929") == table.price("claude-sonnet-4")
    assert table.cost_micros("deepseek-reasoner", 6, 212) == round(6 * 0.55 + 212 * 2.19)
    assert table.cost_micros("scripted:tokens=5", 100, 100) == 0


def test_unknown_model_costs_zero_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="turngate.adapters")
    table = PriceTable()
    assert table.cost_micros("mystery-model", 100, 100) == 0
    assert table.cost_micros("mystery-model", 5, 5) == 0
    assert table.cost_micros("other-mystery", 5, 5) == 0
    warnings = [r for r in caplog.records if "price_unknown" in r.getMessage()]
    assert len(warnings) == 2


def test_load_from_json_text_and_file(tmp_path: Path) -> None:
    text = '{"my-model": {"input": 1, "output": "2.5"}, "gpt-4o": {"input": 0, "output": 0}}'
    inline = PriceTable.load(text)
    assert inline.cost_micros("my-model-v2", 1000, 1000) == 3500
    assert inline.cost_micros("gpt-4o", 1000, 1000) == 0  # overrides the default
    assert inline.price("gpt-4o-mini") is not None  # defaults kept
    path = tmp_path / "prices.json"
    path.write_text(text)
    from_file = PriceTable.load(str(path), include_defaults=False)
    assert from_file.models == ["gpt-4o", "my-model"]
    assert from_file.price("my-model") is not None
    assert from_file.price("my-model").output == Decimal("2.5")  # type: ignore[union-attr]
    assert PriceTable.load(None).models == PriceTable().models
    assert PriceTable.load("").models == PriceTable().models


@pytest.mark.parametrize(
    "bad",
    [
        "[1]",
        "{not json",
        '{"m": {"input": 1}}',
        '{"m": {"input": -1, "output": 1}}',
        '{"m": {"input": "abc", "output": 1}}',
        '{"m": {"input": true, "output": 1}}',
        '{"m": 3}',
    ],
)
def test_bad_tables_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        PriceTable.from_json(bad)


def test_missing_file_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot be read"):
        PriceTable.load(str(tmp_path / "nope.json"))


# Pieces of a stream written with "\n" line endings only (the decoder's fast path),
# including what that path must still hand to the general one: comments, other fields,
# "data" without a colon or without the space, invalid and split UTF-8.
_LF_PIECES = [b"data: ", b"data:", b"data", b"data:  two spaces", b"event: e", b"event:",
              b"id: 4", b"retry: 9", b": comment", b"other: x", b'{"a":"\\u00e9"}',
              b"caf\xc3\xa9", b"\xf0\x9f", b"\x98\x8a", b"\xff", b" ", b"\n", b"\n", b"\n\n"]


@given(st.lists(st.sampled_from(_LF_PIECES), max_size=40), st.data())
@settings(max_examples=400, deadline=None)
def test_lf_only_streams_parse_as_their_crlf_twins(pieces: list[bytes],
                                                   data: st.DataObject) -> None:
    """A stream whose lines end in "\\n" only gives the same events, ``id`` and
    ``retry`` as the same stream with "\\r\\n" endings, however either is split
    across reads (the two take different paths through the decoder)."""
    body = b"".join(pieces)

    def run(stream: bytes) -> tuple[list[SSEEvent], str, int | None]:
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
        decoder = SSEDecoder()
        events: list[SSEEvent] = []
        for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            events += decoder.feed(stream[a:b])
        return events + decoder.flush(), decoder.last_event_id, decoder.retry_ms

    assert run(body) == run(body.replace(b"\n", b"\r\n"))


def test_lf_only_stream_over_the_size_limit_is_a_protocol_error() -> None:
    decoder = SSEDecoder(max_event_bytes=100)
    decoder.feed(b"data: " + b"x" * 60 + b"\n")
    with pytest.raises(UpstreamProtocolError):
        decoder.feed(b"data: " + b"x" * 60 + b"\n")
