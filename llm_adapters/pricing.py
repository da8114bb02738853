"""Token prices and the cost of a call in integer micro-dollars.

A :class:`PriceTable` maps a model to its input and output price in USD per
million tokens, which is the same number as micro-dollars per token, so::

    cost_micros = round(prompt_tokens * input + completion_tokens * output)

(computed in ``Decimal``, rounded half up). The JSON form is
``{"gpt-4o-mini": {"input": 0.15, "output": 0.6}, ...}``.

Lookup of a model name: an exact key first, then the longest key that is a
prefix of the name (``gpt-4o-2024-08-06`` -> ``gpt-4o``; ``gpt-4o-mini-2024-07-18``
-> ``gpt-4o-mini``). A name of the form ``<adapter>:<model>`` (``openai:gpt-4o``) is
tried as it is, then without its adapter part. An unknown model costs 0 and logs
one warning per model name.

The built-in :data:`DEFAULT_PRICES` are list prices at the time of writing and
only a convenience: production should load its own table
(:meth:`PriceTable.load`), which is merged over the defaults.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

logger = logging.getLogger("turngate.adapters")


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million tokens (= micro-dollars per token)."""

    input: Decimal
    output: Decimal


DEFAULT_PRICES: dict[str, dict[str, float]] = {
    # OpenAI
    "gpt-4o": {"input": 2.5, "output": 10.0},
    "gpt-4o-mini": {"input": 0.15, "output": 0.6},
    "gpt-4.1": {"input": 2.0, "output": 8.0},
    "gpt-4.1-mini": {"input": 0.4, "output": 1.6},
    "gpt-4.1-nano": {"input": 0.1, "output": 0.4},
    "o3-mini": {"input": 1.1, "output": 4.4},
    "o4-mini": {"input": 1.1, "output": 4.4},
    # Anthropic
    "claude-opus-4": {"input": 15.0, "output": 75.0},
    "claude-sonnet-4": {"input": 3.0, "output": 15.0},
    "claude-haiku-4-5": {"input": 1.0, "output": 5.0},
    "claude-3-5-haiku": {"input": 0.8, "output": 4.0},
    # DeepSeek
    "deepseek-chat": {"input": 0.27, "output": 1.1},
    "deepseek-reasoner": {"input": 0.55, "output": 2.19},
    # the offline adapter costs nothing
    "scripted": {"input": 0.0, "output": 0.0},
}


def _price(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"price table: {where} must be a number, got {value!r}")
    try:
        price = Decimal(str(value))
    except ArithmeticError as exc:
        raise ValueError(f"price table: {where} must be a number, got {value!r}") from exc
    if not price.is_finite() or price < 0:
        raise ValueError(f"price table: {where} must be a finite number >= 0, got {value!r}")
    return price


def parse_prices(data: Any) -> dict[str, ModelPrice]:
    """Validate a ``{model: {"input": n, "output": n}}`` mapping; ValueError if bad."""
    if not isinstance(data, Mapping):
        raise ValueError("price table must be a JSON object of model -> {input, output}")
    prices: dict[str, ModelPrice] = {}
    for model, entry in data.items():
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"price table: model name {model!r} must be a non-empty string")
        if not isinstance(entry, Mapping) or not {"input", "output"} <= set(entry):
            raise ValueError(f"price table: {model!r} needs both \"input\" and \"output\"")
        prices[model.strip()] = ModelPrice(
            _price(entry["input"], f"{model}.input"), _price(entry["output"], f"{model}.output")
        )
    return prices


class PriceTable:
    """Per-model prices, with exact-then-longest-prefix lookup."""

    def __init__(
        self, prices: Mapping[str, Any] | None = None, *, include_defaults: bool = True
    ) -> None:
        self._prices: dict[str, ModelPrice] = (
            parse_prices(DEFAULT_PRICES) if include_defaults else {}
        )
        if prices:
            self._prices.update(parse_prices(prices))
        # longest first, so the first prefix that matches is the longest
        self._by_length = sorted(self._prices, key=len, reverse=True)
        self._warned: set[str] = set()

    @classmethod
    def from_json(cls, text: str, *, include_defaults: bool = True) -> PriceTable:
        """A table from JSON text; ValueError (naming the problem) if it is invalid."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"price table is not valid JSON: {exc}") from exc
        return cls(data, include_defaults=include_defaults)

    @classmethod
    def load(cls, source: str | Path | None, *, include_defaults: bool = True) -> PriceTable:
        """A table from a setting: None/empty -> defaults; inline JSON (starts with
        ``{``) or the path of a JSON file. Raises ValueError on a bad value."""
        if source is None or (isinstance(source, str) and not source.strip()):
            return cls(include_defaults=include_defaults)
        if isinstance(source, str) and source.lstrip().startswith("{"):
            return cls.from_json(source, include_defaults=include_defaults)
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"price table file {str(path)!r} cannot be read: {exc}") from exc
        return cls.from_json(text, include_defaults=include_defaults)

    @property
    def models(self) -> list[str]:
        return sorted(self._prices)

    def price(self, model: str) -> ModelPrice | None:
        """The price of ``model`` (exact, then longest prefix), or None if unknown."""
        candidates = [model]
        adapter, sep, rest = model.partition(":")
        if sep and rest:
            candidates.append(rest)
        for name in candidates:
            found = self._prices.get(name)
            if found is not None:
                return found
        for name in candidates:
            for key in self._by_length:
                if name.startswith(key):
                    return self._prices[key]
        return None

    def cost_micros(self, model: str, prompt_tokens: int, completion_tokens: int) -> int:
        """The cost in integer micro-dollars (rounded half up); 0 for an unknown model."""
        price = self.price(model)
        if price is None:
            if model not in self._warned and len(self._warned) < 10_000:
                self._warned.add(model)
                logger.warning("price_unknown model=%r: cost counted as 0", model[:200])
            return 0
        total = price.input * max(0, prompt_tokens) + price.output * max(0, completion_tokens)
        return int(total.quantize(Decimal(1), rounding=ROUND_HALF_UP))


__all__ = ["DEFAULT_PRICES", "ModelPrice", "PriceTable", "parse_prices"]
