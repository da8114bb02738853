"""``ContentBuilder`` on streams of text and reasoning deltas: the parts and the event
map it keeps, against an oracle written out here."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.turn.accumulator import ContentBuilder
from llm_adapters.events import ReasoningDelta, TextDelta


@given(st.lists(st.tuples(st.sampled_from(["text", "reasoning"]), st.text(max_size=6)),
                max_size=30))
@settings(max_examples=300, deadline=None)
def test_deltas_merge_into_one_part_per_run_of_one_kind(
    deltas: list[tuple[str, str]],
) -> None:
    """Consecutive non-empty deltas of one kind make one part (an empty delta is no
    event and splits nothing); the event map keeps each part's delta lengths; the
    snapshot is the same whether taken mid-part or after the part was sealed."""
    builder = ContentBuilder()
    parts: list[dict[str, Any]] = []
    lengths: list[list[int]] = []
    for kind, text in deltas:
        builder.feed(TextDelta(text) if kind == "text" else ReasoningDelta(text))
        if not text:
            continue
        if parts and parts[-1]["type"] == kind:
            parts[-1]["text"] += text
            lengths[-1].append(len(text))
        else:
            parts.append({"type": kind, "text": text})
            lengths.append([len(text)])
    assert builder.snapshot() == parts
    assert builder.event_map() == lengths
    assert builder.text_length() == sum(len(p["text"]) for p in parts)
    assert builder.is_empty() == (not parts)
