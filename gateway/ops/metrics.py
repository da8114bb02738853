"""Prometheus metrics, one registry per app (so tests can run several apps)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The gateway's metrics."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # python_gc_*: the process's garbage collections by generation (``turngate
        # serve`` tunes the collector: ``gateway.ops.cli.tune_gc``).
        GCCollector(registry=r)
        self.generations_started = Counter(
            "turngate_generations_started", "Adapter calls started (new generations).",
            registry=r,
        )
        self.turns_finalized = Counter(
            "turngate_turns_finalized",
            "Turns whose final row is written, by final status.", ["status"],
            registry=r,
        )
        self.active_streams = Gauge(
            "turngate_active_streams", "Open turn streams (HTTP responses).", registry=r
        )
        self.active_generations = Gauge(
            "turngate_active_generations",
            "Turns whose adapter is producing in this process (0 once it stopped).", registry=r
        )
        self.finalizing = Gauge(
            "turngate_finalizing",
            "Turns whose generation stopped and whose final write is under way (or retried).",
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "turngate_time_to_first_token_seconds",
            "From the turn request to the first delta from the adapter.", buckets=_FAST,
            registry=r,
        )
        self.finalize_retries = Counter(
            "turngate_finalize_retries",
            "Final writes that failed and were tried again (database down or stalled).",
            registry=r,
        )
        self.finalize_duration = Histogram(
            "turngate_finalize_duration_seconds", "Duration of the finalize write.",
            buckets=_FAST, registry=r,
        )
        self.db_operation = Histogram(
            "turngate_db_operation_seconds", "Database operations by operation and outcome.",
            ["operation", "outcome"], buckets=_FAST, registry=r,
        )
        # Its children by (operation, outcome): ``labels`` checks its arguments and takes
        # a lock on every call, and each turn's open statement reports here before the
        # turn's generation starts.
        self._db_children: dict[tuple[str, str], Histogram] = {}
        self.upstream_errors = Counter(
            "turngate_upstream_errors", "Upstream (adapter) errors by adapter.", ["adapter"],
            registry=r,
        )

    def observe_db(self, operation: str, outcome: str, seconds: float) -> None:
        """The persistence layer's operation observer."""
        child = self._db_children.get((operation, outcome))
        if child is None:
            child = self._db_children[operation, outcome] = self.db_operation.labels(
                operation, outcome
            )
        child.observe(seconds)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


__all__ = ["Metrics"]
