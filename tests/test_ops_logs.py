"""Log lines: text by default, one JSON object per line when configured; every
persistence write and each turn's start and end; no secrets, no content unless
TURNGATE_LOG_CONTENT asks (and then at debug level only)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from gateway.ops.logs import THIRD_PARTY_LEVELS, JsonFormatter, configure_logging, quiet_third_party
from persistence import KEY_SECRET_LEN
from tests.fixtures_server import run_gateway

SECRET_TEXT = "purple-elephant-42"


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Everything logged (debug and up) as JSON lines, like TURNGATE_LOG_FORMAT=json."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    saved = {name: logging.getLogger(name).level for name in THIRD_PARTY_LEVELS}
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # as TURNGATE_LOG_LEVEL=debug
    quiet_third_party()  # as configure_logging does
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


async def _run_turns(database_url: str, **env: str) -> str:
    async with run_gateway(database_url, **env) as gw, gw.client() as api:
        thread_id = await gw.new_thread(api)
        r = await api.post(f"/v1/threads/{thread_id}/turns",
                           json={"turn_id": "t1", "text": f"say {SECRET_TEXT}",
                                 "model": "scripted:tokens=4"})
        assert r.status_code == 200
        return gw.key


@pytest.mark.anyio
async def test_json_lines_persistence_and_turns(database_url: str,
                                                json_log: io.StringIO) -> None:
    key = await _run_turns(database_url)
    lines = [line for line in json_log.getvalue().splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # one object per line
    assert all({"ts", "level", "logger", "message"} <= set(e) for e in events)

    db_ops = [e for e in events if e.get("event") == "db_op"]
    ops = {e["op"] for e in db_ops}
    assert {"create_thread", "open_turn", "finalize_turn"} <= ops
    for e in db_ops:
        assert e["outcome"] and isinstance(e["duration_ms"], float | int)

    (start,) = [e for e in events if e.get("event") == "turn_start"]
    (end,) = [e for e in events if e.get("event") == "turn_end"]
    for e in (start, end):
        assert e["turn_id"] == "t1" and e["thread_id"] and e["message_id"]
    assert start["model"] == "scripted:tokens=4"
    assert end["status"] == "complete"
    assert end["completion_tokens"] == 4 and end["total_tokens"] >= 4
    assert "cost_micros" in end and end["duration_ms"] > 0

    text = json_log.getvalue()
    assert key not in text and key[-KEY_SECRET_LEN:] not in text
    assert SECRET_TEXT not in text  # no message content by default


@pytest.mark.anyio
async def test_content_only_when_asked_and_only_at_debug(database_url: str,
                                                         json_log: io.StringIO) -> None:
    key = await _run_turns(database_url, TURNGATE_LOG_CONTENT="true")
    events = [json.loads(line) for line in json_log.getvalue().splitlines() if line.strip()]
    with_content = [e for e in events if SECRET_TEXT in json.dumps(e)]
    assert with_content, "TURNGATE_LOG_CONTENT=true logs the turn's text"
    assert {e["level"] for e in with_content} == {"debug"}
    assert key not in json_log.getvalue()


def test_text_format_by_default_and_json_when_configured(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    saved_levels = {name: logging.getLogger(name).level for name in THIRD_PARTY_LEVELS}
    try:
        configure_logging()
        logging.getLogger("turngate.test").info(
            "turn_end status=%s", "complete", extra={"event": "turn_end", "status": "complete"}
        )
        line = capsys.readouterr().err.strip()
        assert line.endswith("INFO    turngate.test: turn_end status=complete")
        with pytest.raises(ValueError):
            json.loads(line)

        configure_logging("json", "info")
        logging.getLogger("turngate.test").info(
            "turn_end status=%s", "complete", extra={"event": "turn_end", "status": "complete"}
        )
        logging.getLogger("turngate.test").debug("hidden below the level")
        (line,) = capsys.readouterr().err.strip().splitlines()
        obj = json.loads(line)
        assert obj["event"] == "turn_end" and obj["status"] == "complete"
        assert obj["level"] == "info" and obj["logger"] == "turngate.test"
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
