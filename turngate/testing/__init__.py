"""A kit for testing against turngate: a live server, a browser-like stream client,
and the adapter conformance checks behind ``turngate check-adapter``.

Usable from pytest (anyio's plugin, asyncio backend) and from plain scripts
(``anyio.run(main, backend="asyncio")``)::

    from turngate.testing import live_server, start_turn, resume_turn, wait_final

    async with live_server(env={"TURNGATE_ON_DISCONNECT": "continue"}) as server:
        thread = await server.new_thread()
        turn_id, first = await start_turn(
            server.client, thread, "hi", model="scripted:tokens=50", leave_after=5
        )                                      # a browser that left after 5 events
        rest = await resume_turn(server.client, thread, turn_id, first.last_id)
        final = await wait_final(server.client, thread, turn_id)
        final.status, final.text, final.usage  # the row and its token_usage rows

Nothing here imports test-only code; turngate's own test suite uses it.
See docs/ADAPTERS.md.
"""

from turngate.testing._server import START_TIMEOUT, LiveServer, free_port, live_server
from turngate.testing._stream import (
    FINAL_STATUSES,
    FINISH_REASONS,
    REQUIRED,
    FinalTurn,
    SSEEvent,
    SSEParser,
    Stream,
    TurnReader,
    open_turn,
    parse_sse,
    resume_turn,
    start_turn,
    stream_request,
    turn_body,
    usage_summary,
    validate_ui_stream,
    wait_final,
)

__all__ = [
    "FINAL_STATUSES",
    "FINISH_REASONS",
    "REQUIRED",
    "START_TIMEOUT",
    "FinalTurn",
    "LiveServer",
    "SSEEvent",
    "SSEParser",
    "Stream",
    "TurnReader",
    "free_port",
    "live_server",
    "open_turn",
    "parse_sse",
    "resume_turn",
    "start_turn",
    "stream_request",
    "turn_body",
    "usage_summary",
    "validate_ui_stream",
    "wait_final",
]
