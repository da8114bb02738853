"""Upstream stream bodies for the adapter tests, and what each one must produce.

Two corpora, one schema (:class:`StreamCase`):

- **fixture**: the project's own streams in ``tests/fixtures/streams/``, written by
  hand from each provider's documented stream format (see the README there).
  They are always present and alone cover every case the adapter tests assert.
- **recording**: real captured streams in ``../shared/recordings`` (outside the
  repository; provenance in its ``SOURCES.md``), an extra corpus. Used when the
  folder is there; required when ``CI=true``; otherwise simply not generated
  (see :func:`tests.upstream_fakes.recordings_in_use`).

Every scenario has a fixture case; :func:`cases` gives a test its parameters
(fixture first, then the recording when it is in use), so no parameter set is
ever empty. The values below are oracles worked out from the stream bodies by
hand (for the recordings: from ``SOURCES.md``), never taken from an adapter's
output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from tests.upstream_fakes import fixture, recording, recordings_in_use


@dataclass(frozen=True)
class Text:
    """A partial oracle for a long text: how it starts, its length, how it ends."""

    start: str
    length: int | None = None
    end: str | None = None

    def check(self, actual: str) -> None:
        assert actual.startswith(self.start), actual[:120]
        if self.length is not None:
            assert len(actual) == self.length, len(actual)
        if self.end is not None:
            assert actual.rstrip().endswith(self.end), actual[-120:]


def check_text(actual: str, expected: str | Text) -> None:
    if isinstance(expected, Text):
        expected.check(actual)
    else:
        assert actual == expected


def tool(call_id: str, name: str, args_text: str, **extra: Any) -> dict[str, Any]:
    """An expected persisted tool-call part (``result=...``: a result must be there)."""
    return {"type": "tool-call", "toolCallId": call_id, "toolName": name,
            "argsText": args_text, "args": json.loads(args_text), **extra}


@dataclass(frozen=True)
class StreamCase:
    scenario: str
    origin: Literal["fixture", "recording"]
    file: str
    #: the turn's model string, ``<adapter>:<model>``
    model: str
    #: the model name the provider reports in the stream
    usage_model: str
    #: the assistant's parts as the gateway persists them: text / reasoning / tool-call
    parts: tuple[dict[str, Any], ...]
    #: the adapter's ``Finish.reason``, or ``"error"`` when the stream raises
    finish: str
    #: the final (prompt, completion) tokens; None: the provider never reported usage
    usage: tuple[int, int] | None
    #: key of the e2e price table; None: an unpriced model (costs 0, warns once)
    price: str | None
    #: Anthropic: the provisional (input, output) tokens of ``message_start``
    first_usage: tuple[int, int] | None = None
    text_deltas: int | None = None
    reasoning_deltas: int | None = None
    #: non-empty argument fragments per tool call id (each is one ToolCallDelta)
    fragments: dict[str, int] = field(default_factory=dict)
    #: length of the thinking block's signature (never output)
    signature_length: int | None = None
    #: the body ends right after its last data line, with no closing blank line
    no_final_blank_line: bool = False
    #: text the adapter's error message must name (type, code)
    error_includes: tuple[str, ...] = ()
    #: provider text that must reach neither the error message nor the browser,
    #: the database or the logs
    provider_texts: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.origin}:{self.file}"

    def body(self) -> bytes:
        return fixture(self.file) if self.origin == "fixture" else recording(self.file)

    @property
    def text(self) -> str | Text:
        texts = [p["text"] for p in self.parts if p["type"] == "text"]
        if len(texts) == 1:
            return texts[0]  # type: ignore[no-any-return]
        assert all(isinstance(t, str) for t in texts)
        return "".join(texts)

    @property
    def reasoning(self) -> str | Text:
        texts = [p["text"] for p in self.parts if p["type"] == "reasoning"]
        assert len(texts) <= 1
        return texts[0] if texts else ""  # type: ignore[no-any-return]

    @property
    def tool_calls(self) -> list[tuple[str, str, str]]:
        return [(p["toolCallId"], p["toolName"], p["argsText"])
                for p in self.parts if p["type"] == "tool-call"]

    @property
    def tool_results(self) -> list[str]:
        return [p["toolCallId"] for p in self.parts if p["type"] == "tool-call" and "result" in p]


def _fixture(scenario: str, file: str, **kw: Any) -> StreamCase:
    return StreamCase(scenario, "fixture", file, **kw)


def _recording(scenario: str, file: str, **kw: Any) -> StreamCase:
    return StreamCase(scenario, "recording", file, **kw)


OPENAI_TEXT = ("Tide pools form where the sea leaves water behind at low tide, and each one "
               "holds its own small world.")
OPENAI_TEXT_RECORDED = (
    "I'm unable to provide real-time weather updates. To get the current weather in "
    "San Francisco, I recommend checking a reliable weather website or a weather app."
)
SIGNATURE_TEXT = '1. **Quill** - for the spines\n2. **Crème** - soft and sweet'

FIXTURES: list[StreamCase] = [
    # --- OpenAI Chat Completions and compatible providers ---------------------------
    _fixture(
        # text; finish chunk with an empty delta; usage in a final choices:[] chunk;
        # the other chunks carry no "usage" key at all
        "openai-text", "openai-text-usage.sse",
        model="openai:gpt-4o", usage_model="gpt-4o-2024-08-06",
        parts=({"type": "text", "text": OPENAI_TEXT},),
        finish="stop", usage=(19, 23), price="gpt-4o", text_deltas=22,
    ),
    _fixture(
        # two parallel calls, arguments in fragments, id/type/name on the first only
        "openai-parallel-tools", "openai-tool-calls-parallel-fragmented.sse",
        model="openai:gpt-4o", usage_model="gpt-4o-2024-08-06",
        parts=(tool("call_TGforecast7Qm2x", "get_forecast", '{"place": "Tromsø", "days": 3}'),
               tool("call_TGtides9Kp4vR", "get_tide_table",
                    '{"port": "Brest", "date": "2026-12-01"}')),
        finish="tool-calls", usage=(88, 41), price="gpt-4o",
        fragments={"call_TGforecast7Qm2x": 7, "call_TGtides9Kp4vR": 6},
    ),
    _fixture(
        "openai-single-tool", "openai-tool-call-single.sse",
        model="openai:gpt-4o", usage_model="gpt-4o-2024-08-06",
        parts=(tool("call_TGconvert3Hs8", "convert_units",
                    '{"value":12.5,"from":"mi","to":"km"}'),),
        finish="tool-calls", usage=(53, 22), price="gpt-4o",
        fragments={"call_TGconvert3Hs8": 7},
    ),
    _fixture(
        # delta.reasoning_content (content null), then content (reasoning_content null);
        # "usage":null on every chunk, the figures on the non-empty finish chunk
        "deepseek-reasoning", "deepseek-reasoning-content-usage.sse",
        model="openai:deepseek-reasoner", usage_model="deepseek-reasoner",
        parts=({"type": "reasoning", "text": Text(
                    "The user says good morning. A short, warm reply", 104)},
               {"type": "text", "text": "Good morning! 🌅 What shall we look at today?"}),
        finish="stop", usage=(9, 61), price="deepseek-reasoner",
        reasoning_deltas=25, text_deltas=11,
    ),
    _fixture(
        # ": OPENROUTER PROCESSING" comments; delta.reasoning; a chunk with a top-level
        # "error" object that also carries the usage, then [DONE]
        "openrouter-error-chunk", "openrouter-reasoning-error-midstream.sse",
        model="openai:z-ai/glm-4.5-air:free", usage_model="z-ai/glm-4.5-air:free",
        parts=({"type": "reasoning", "text": "Greeting received; answer briefly and"},),
        finish="error", usage=(37, 8), price=None, reasoning_deltas=5,
        provider_texts=("max output reached upstream", "Provider returned error"),
    ),
    _fixture(
        # delta.reasoning, then a named "event: error" frame; no finish, usage or [DONE]
        "groq-error-event", "groq-reasoning-error-event-midstream.sse",
        model="openai:qwen/qwen3-32b", usage_model="qwen/qwen3-32b",
        parts=({"type": "reasoning", "text": Text("I should call lookup_city now")},),
        finish="error", usage=None, price="qwen/qwen3-32b", reasoning_deltas=15,
        error_includes=("tool_use_failed", "invalid_request_error"),
        provider_texts=("Tool call validation failed", "did not match schema",
                        "additionalProperties", "failed_generation"),
    ),
    # --- Anthropic Messages ---------------------------------------------------------
    _fixture(
        # ping; JSON padded with spaces before the closing brace; cumulative usage
        "anthropic-text", "anthropic-text-usage.sse",
        model="anthropic:claude-sonnet-4-5", usage_model="claude-sonnet-4-5-20250929",
        parts=({"type": "text",
                "text": "Two facts:\n- Otters hold hands while they sleep\n- Owls cannot move "
                        "their eyes"},),
        finish="stop", usage=(25, 18), price="claude-sonnet-4", first_usage=(25, 1),
        text_deltas=4,
    ),
    _fixture(
        # text, then tool_use with input_json_delta ("" first); message_delta has
        # output_tokens only; no blank line after message_stop
        "anthropic-tool-use", "anthropic-tool-use-input-json-delta.sse",
        model="anthropic:claude-sonnet-4-0", usage_model="claude-sonnet-4-20250514",
        parts=({"type": "text", "text": "Let me look up the opening hours of the Louvre."},
               tool("toolu_01TGhours0008Xy7", "get_opening_hours",
                    '{"venue": "Louvre", "day": "sunday"}')),
        finish="tool-calls", usage=(402, 58), price="claude-sonnet-4", first_usage=(402, 2),
        text_deltas=3, fragments={"toolu_01TGhours0008Xy7": 5}, no_final_blank_line=True,
    ),
    _fixture(
        # thinking block: thinking_deltas (the last one empty) and a signature_delta
        "anthropic-thinking", "anthropic-thinking-signature.sse",
        model="anthropic:claude-haiku-4-5", usage_model="claude-haiku-4-5-20251001",
        parts=({"type": "reasoning", "text": Text(
                    "They want one name for a pet hedgehog", None, "Two options will do:")},
               {"type": "text", "text": SIGNATURE_TEXT}),
        finish="stop", usage=(52, 97), price="claude-haiku-4-5", first_usage=(52, 4),
        reasoning_deltas=5, text_deltas=3, signature_length=512,
    ),
    _fixture(
        # a server tool (server_tool_use + web_search_tool_result), text, a tool_use;
        # message_delta's input_tokens (1874) supersede message_start's (610)
        "anthropic-server-tool", "anthropic-server-tool-then-tool-use.sse",
        model="anthropic:claude-sonnet-4-6", usage_model="claude-sonnet-4-6",
        parts=({"type": "text", "text": "I'll search for today's ferry timetable first."},
               tool("srvtoolu_01TGsearch0010Ab", "web_search",
                    '{"query": "Helsinki Tallinn ferry timetable"}', result=...),
               {"type": "text", "text": "Found it. Now I'll ask the booking tool for seats."},
               tool("toolu_01TGseats0010Cd", "check_seats",
                    '{"route": "HEL-TLL", "date": "2026-12-02"}')),
        finish="tool-calls", usage=(1874, 143), price="claude-sonnet-4", first_usage=(610, 3),
        fragments={"srvtoolu_01TGsearch0010Ab": 5, "toolu_01TGseats0010Cd": 5},
    ),
]

# The oracles of ../shared/recordings/SOURCES.md.
RECORDINGS: list[StreamCase] = [
    _recording(
        "openai-text", "openai-text-usage.sse",
        model="openai:gpt-4o", usage_model="gpt-4o-2024-08-06",
        parts=({"type": "text", "text": OPENAI_TEXT_RECORDED},),
        finish="stop", usage=(14, 30), price="gpt-4o",
    ),
    _recording(
        "openai-parallel-tools", "openai-tool-calls-parallel-fragmented.sse",
        model="openai:gpt-4o", usage_model="gpt-4o-2024-08-06",
        parts=(tool("call_JMW1whyEaYG438VE1OIflxA2", "GetWeatherArgs",
                    '{"city": "Edinburgh", "country": "GB", "units": "c"}'),
               tool("call_DNYTawLBoN8fj3KN6qU9N1Ou", "get_stock_price",
                    '{"ticker": "AAPL", "exchange": "NASDAQ"}')),
        finish="tool-calls", usage=(149, 60), price="gpt-4o",
        # SOURCES.md counts 12 and 10 fragments, the first of each empty
        fragments={"call_JMW1whyEaYG438VE1OIflxA2": 11, "call_DNYTawLBoN8fj3KN6qU9N1Ou": 9},
    ),
    _recording(
        "openai-single-tool", "openai-tool-call-single.sse",
        model="openai:gpt-4o", usage_model="gpt-4o-2024-08-06",
        parts=(tool("call_CTf1nWJLqSeRgDqaCG27xZ74", "get_weather",
                    '{"city":"San Francisco","state":"CA"}'),),
        finish="tool-calls", usage=(48, 19), price="gpt-4o",
        fragments={"call_CTf1nWJLqSeRgDqaCG27xZ74": 10},
    ),
    _recording(
        "deepseek-reasoning", "deepseek-reasoning-content-usage.sse",
        model="openai:deepseek-reasoner", usage_model="deepseek-reasoner",
        parts=({"type": "reasoning", "text": Text(
                    'Hmm, the user just said "Hello". It\'s a simple greeting', 882)},
               {"type": "text", "text": "Hello there! 😊 How can I help you today?"}),
        finish="stop", usage=(6, 212), price="deepseek-reasoner", reasoning_deltas=198,
    ),
    _recording(
        "openrouter-error-chunk", "openrouter-reasoning-error-midstream.sse",
        model="openai:minimax/minimax-m2:free", usage_model="minimax/minimax-m2:free",
        parts=({"type": "reasoning", "text": "We need to respond to a greeting. The user"},),
        finish="error", usage=(43, 10), price=None,
        provider_texts=("Token limit reached",),
    ),
    _recording(
        "groq-error-event", "groq-reasoning-error-event-midstream.sse",
        model="openai:openai/gpt-oss-120b", usage_model="openai/gpt-oss-120b",
        parts=({"type": "reasoning",
                "text": Text("We need to call the tool with invalid parameters first")},),
        finish="error", usage=None, price="openai/gpt-oss-120b", reasoning_deltas=93,
        error_includes=("tool_use_failed", "invalid_request_error"),
        provider_texts=("Tool call validation failed", "get_something_by_name",
                        "failed_generation"),
    ),
    _recording(
        "anthropic-text", "anthropic-text-usage.sse",
        model="anthropic:claude-sonnet-4-5", usage_model="claude-sonnet-4-5-20250929",
        parts=({"type": "text", "text": "- Captain\n- Scoop"},),
        finish="stop", usage=(17, 10), price="claude-sonnet-4", first_usage=(17, 1),
        text_deltas=4,
    ),
    _recording(
        "anthropic-tool-use", "anthropic-tool-use-input-json-delta.sse",
        model="anthropic:claude-sonnet-4-0", usage_model="claude-sonnet-4-20250514",
        parts=({"type": "text", "text": "I'll check the current weather in Paris for you."},
               tool("toolu_01NRLabsLyVHZPKxbKvkfSMn", "get_weather", '{"location": "Paris"}')),
        finish="tool-calls", usage=(377, 65), price="claude-sonnet-4", first_usage=(377, 1),
        fragments={"toolu_01NRLabsLyVHZPKxbKvkfSMn": 4}, no_final_blank_line=True,
    ),
    _recording(
        "anthropic-thinking", "anthropic-thinking-signature.sse",
        model="anthropic:claude-haiku-4-5", usage_model="claude-haiku-4-5-20251001",
        parts=({"type": "reasoning", "text": Text(
                    "The user wants two names for a pet pelican, and they want me to be brief.",
                    None, "Let me give two brief, catchy names:")},
               {"type": "text", "text": '1. **Pouch** - references their iconic bill pouch\n'
                                        '2. **Pelé** - playful take on "pelican"'}),
        finish="stop", usage=(46, 133), price="claude-haiku-4-5", first_usage=(46, 3),
        reasoning_deltas=5, signature_length=656,
    ),
    _recording(
        "anthropic-server-tool", "anthropic-server-tool-then-tool-use.sse",
        model="anthropic:claude-sonnet-4-6", usage_model="claude-sonnet-4-6",
        parts=({"type": "text", "text":
                    "Let me search for a tool that can provide current exchange rate information."},
               tool("srvtoolu_01S5swZdBmTzLDVzwcT5LbHp", "tool_search_tool_bm25",
                    '{"query": "USD EUR exchange rate currency conversion"}', result=...),
               {"type": "text", "text": "I found the right tool! Let me fetch the current USD "
                                        "to EUR exchange rate for you."},
               tool("toolu_01EFn5wTNBYA8Reni8rbmnHT", "get_exchange_rate",
                    '{"from_currency": "USD", "to_currency": "EUR"}')),
        finish="tool-calls", usage=(1591, 175), price="claude-sonnet-4", first_usage=(702, 1),
    ),
]

SCENARIOS = [c.scenario for c in FIXTURES]
_BY_KEY = {(c.scenario, c.origin): c for c in FIXTURES + RECORDINGS}
assert len(_BY_KEY) == len(FIXTURES) + len(RECORDINGS)
assert sorted(c.scenario for c in RECORDINGS) == sorted(SCENARIOS)


def case(scenario: str, origin: Literal["fixture", "recording"] = "fixture") -> StreamCase:
    return _BY_KEY[(scenario, origin)]


def cases(*scenarios: str) -> list[Any]:
    """``pytest.param``\\ s for ``scenarios`` (all when none is named): each project
    fixture, then each recording when recordings are in use."""
    names = scenarios or tuple(SCENARIOS)
    chosen = [case(s) for s in names]
    if recordings_in_use():
        chosen += [case(s, "recording") for s in names]
    return [pytest.param(c, id=c.id) for c in chosen]


__all__ = [
    "FIXTURES",
    "RECORDINGS",
    "SCENARIOS",
    "StreamCase",
    "Text",
    "case",
    "cases",
    "check_text",
    "tool",
]
