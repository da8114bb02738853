"""Configuration: every bad value stops start-up with a message naming the
variable; ``turngate serve --help`` and the README list every setting."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.ops.settings import SETTINGS, Settings, settings_markdown
from turngate.exceptions import ConfigError

ROOT = Path(__file__).resolve().parent.parent
TURNGATE = str(Path(sys.executable).parent / "turngate")

# Bad values for every setting; a setting added without an entry fails the test below.
BAD: dict[str, list[str]] = {
    "DATABASE_URL": ["mysql://root@localhost/db", "turngate.db", ""],
    "TURNGATE_DEFAULT_MODEL": [":gpt-4o", "", "  "],
    "OPENAI_BASE_URL": ["api.openai.com/v1", "ftp://example.com", "http://"],
    "OPENAI_API_KEY": ["sk-abc def", "sk-abc\ndef"],
    "ANTHROPIC_BASE_URL": ["anthropic", "https://"],
    "ANTHROPIC_API_KEY": ["key with spaces", "k\tey"],
    "TURNGATE_ON_DISCONNECT": ["stop", "", "1", "graceful"],
    "TURNGATE_DISCONNECT_GRACE_SECONDS": ["-1", "soon", "nan", "inf"],
    "TURNGATE_CHECKPOINT_SECONDS": ["0", "-1", "abc", "nan", "inf", ""],
    "TURNGATE_LEASE_SECONDS": ["0", "-5", "x", "nan"],
    "TURNGATE_FINALIZE_TIMEOUT": ["0", "soon", "-0.1"],
    "TURNGATE_SEND_TIMEOUT": ["0", "ten", "inf"],
    "TURNGATE_HEADER_TIMEOUT": ["0", "-2", "soon"],
    "TURNGATE_MAX_HEADER_BYTES": ["0", "32k", "-1"],
    "TURNGATE_MAX_PENDING_CONNECTIONS": ["0", "many", "1.5"],
    "TURNGATE_PING_SECONDS": ["0", "-1", "fast"],
    "TURNGATE_SHUTDOWN_GRACE_SECONDS": ["-1", "abc", "nan", "inf"],
    "TURNGATE_RELAY_RETENTION_SECONDS": ["-1", "forever", "inf"],
    "TURNGATE_HISTORY_MESSAGES": ["0", "all", "-3"],
    "TURNGATE_DB_POOL_SIZE": ["0", "big", "2.5"],
    "TURNGATE_MAX_TEXT_CHARS": ["0", "-1", "1.5", "lots", "²", ""],
    "TURNGATE_MAX_ID_CHARS": ["0", "x"],
    "TURNGATE_MAX_IMAGES": ["-1", "four"],
    "TURNGATE_MAX_IMAGE_BYTES": ["8MB", "0"],
    "TURNGATE_MAX_BODY_BYTES": ["1e6", "0"],
    "TURNGATE_MAX_STREAMS_PER_USER": ["0", "many"],
    "TURNGATE_RATE_LIMIT_PER_MINUTE": ["0", "10/s"],
    "TURNGATE_CORS_ORIGINS": ["example.com", "http://", "ftp://example.com"],
    "TURNGATE_PRICES": ["{not json", "[1, 2]", '{"m": {"input": "1"}}', "/no/such/prices.json"],
    "TURNGATE_LOG_FORMAT": ["xml", "JSONL"],
    "TURNGATE_LOG_LEVEL": ["verbose", "trace"],
    "TURNGATE_LOG_CONTENT": ["maybe", "2"],
    "REDIS_URL": ["localhost:6379", "http://redis:6379"],
    "TURNGATE_MCP_CONFIG": ["{not json", '{"servers": {}}', "/no/such/mcp.json",
                            '{"mcpServers": {"t": {}}}'],
    "TURNGATE_MAX_STEPS": ["0", "many", "-1"],
    "TURNGATE_TITLE_MODEL": [":gpt-4o"],
}

# Values that are fine alone but not together.
BAD_COMBINATIONS: list[tuple[dict[str, str], str]] = [
    ({"TURNGATE_LEASE_SECONDS": "2", "TURNGATE_CHECKPOINT_SECONDS": "2"},
     "TURNGATE_LEASE_SECONDS"),
    ({"REDIS_URL": "redis://127.0.0.1:6379/0", "DATABASE_URL": "sqlite:///./x.db"},
     "REDIS_URL"),
]


def test_every_setting_has_bad_values() -> None:
    assert set(BAD) == {s.env for s in SETTINGS}


@pytest.mark.parametrize(
    ("variable", "raw"), [(k, v) for k, values in BAD.items() for v in values]
)
def test_bad_value_names_the_variable(variable: str, raw: str) -> None:
    env = {"DATABASE_URL": "postgresql://u@h/db"} if variable == "REDIS_URL" else {}
    env[variable] = raw
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    message = str(info.value)
    assert variable in message
    assert "must" in message  # and what it accepts
    if variable.endswith("_API_KEY"):
        assert raw.strip() not in message  # secrets are never echoed


@pytest.mark.parametrize(("env", "variable"), BAD_COMBINATIONS)
def test_bad_combination_names_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env(env)


def test_defaults_are_valid_and_match_the_table() -> None:
    settings = Settings.from_env({})
    for s in SETTINGS:
        assert getattr(settings, s.field) == s.parse(s.env, s.default)
    good = Settings.from_env({
        "TURNGATE_SHUTDOWN_GRACE_SECONDS": "0", "TURNGATE_LOG_FORMAT": "JSON",
        "TURNGATE_LOG_CONTENT": "true", "TURNGATE_MAX_IMAGES": " 8 ",
        "TURNGATE_CORS_ORIGINS": "https://a.example, http://localhost:3000",
        "OPENAI_API_KEY": "sk-secret",
    })
    assert good.shutdown_grace_seconds == 0 and good.log_format == "json"
    assert good.log_content is True and good.max_images == 8
    assert "sk-secret" not in repr(good)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TURNGATE_") and k not in {s.env for s in SETTINGS}}
    env.update(extra)
    return env


@pytest.mark.parametrize(
    ("variable", "raw"),
    [("TURNGATE_SHUTDOWN_GRACE_SECONDS", "abc"), ("DATABASE_URL", "mysql://root@db/x"),
     ("TURNGATE_LOG_FORMAT", "xml"), ("TURNGATE_MAX_STREAMS_PER_USER", "0")],
)
def test_serve_refuses_to_start(variable: str, raw: str, tmp_path: Path) -> None:
    env = _env(DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}")
    env[variable] = raw
    result = subprocess.run(
        [TURNGATE, "serve", "--port", "0"], env=env, cwd=tmp_path, capture_output=True,
        text=True, timeout=30,
    )
    assert result.returncode == 2
    assert variable in result.stderr and "configuration error" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.db").exists()  # stopped before touching anything


def test_serve_help_lists_every_setting() -> None:
    result = subprocess.run([TURNGATE, "serve", "--help"], capture_output=True, text=True,
                            timeout=30, env=_env())
    assert result.returncode == 0
    for s in SETTINGS:
        assert s.env in result.stdout


def test_readme_table_matches_settings() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## Configuration\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    assert match, "README has no Configuration section"
    section = match.group(1)
    table = "\n".join(line for line in section.splitlines() if line.startswith("|")) + "\n"
    assert table == settings_markdown(), (
        "README configuration table is stale: regenerate it with `python -m gateway.ops.settings`"
    )


def test_procfile() -> None:
    lines = (ROOT / "Procfile").read_text().splitlines()
    assert "web: turngate serve --host 0.0.0.0 --port $PORT" in lines
    assert "release: turngate migrate" in lines
