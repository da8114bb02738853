"""The SSE reader and UI-message-stream validator of the tests: ``turngate.testing``'s.

Kept under this name so the test files import what they always imported.
"""

from turngate.testing import (
    FINISH_REASONS,
    REQUIRED,
    SSEEvent,
    Stream,
    parse_sse,
    stream_request,
    validate_ui_stream,
)

__all__ = [
    "FINISH_REASONS",
    "REQUIRED",
    "SSEEvent",
    "Stream",
    "parse_sse",
    "stream_request",
    "validate_ui_stream",
]
