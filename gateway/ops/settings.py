"""Configuration from environment variables (a ``.env`` file may set them).

Every setting is declared once in :data:`SETTINGS` with its variable, default,
parser and meaning; the README's configuration table and ``turngate serve
--help`` are generated from it. A bad value raises ``ConfigError`` naming the
variable and what it accepts, which stops start-up.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.tools.config import McpConfig, load_config
from turngate.exceptions import ConfigError


def _positive_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value != value or value == float("inf"):
        raise ConfigError(f"{name}={raw!r}: must be a positive number of seconds, e.g. \"2\"")
    return value


def _non_negative_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ConfigError(f"{name}={raw!r}: must be a number >= 0, e.g. \"10\"")
    return value


def _positive_int(name: str, raw: str) -> int:
    text = raw.strip()
    value = int(text) if text.isascii() and text.isdecimal() else 0
    if value <= 0:
        raise ConfigError(f"{name}={raw!r}: must be a positive integer, e.g. \"8\"")
    return value


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ConfigError(f"{name}={raw!r}: must be one of {', '.join(choices)}")
        return value

    return parse


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name}={raw!r}: must be true or false")


def _database_url(name: str, raw: str) -> str:
    scheme = urlsplit(raw).scheme
    if scheme not in ("sqlite", "postgresql", "postgres"):
        raise ConfigError(
            f"{name}={raw!r}: must be in format \"sqlite:///<path>\" or "
            "\"postgresql://<user>@<host>:<port>/<database>\""
        )
    return raw


def _redis_url(name: str, raw: str) -> str | None:
    if not raw:
        return None
    if urlsplit(raw).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{name}={raw!r}: must be in format \"redis://<host>:<port>/<db>\"")
    return raw


def _http_url(name: str, raw: str) -> str:
    parts = urlsplit(raw.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name}={raw!r}: must be in format \"http[s]://<host>[:<port>][/<path>]\"")
    return raw.strip().rstrip("/")


def _secret(name: str, raw: str) -> str | None:
    # Never echo a secret in an error message.
    if not raw:
        return None
    if any(c.isspace() or not c.isprintable() for c in raw.strip()):
        raise ConfigError(f"{name}: must be a key without spaces or line breaks (value not shown)")
    return raw.strip()


def _model(name: str, raw: str) -> str:
    adapter = raw.partition(":")[0].strip()
    if not adapter:
        raise ConfigError(f"{name}={raw!r}: must be in format \"<adapter>[:<model>]\"")
    return raw.strip()


def _optional_model(name: str, raw: str) -> str | None:
    return _model(name, raw) if raw.strip() else None


def _origins(name: str, raw: str) -> tuple[str, ...]:
    origins = tuple(o.strip() for o in raw.split(",") if o.strip())
    for origin in origins:
        parts = urlsplit(origin)
        if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc):
            raise ConfigError(
                f"{name}: origin {origin!r} must be \"*\" or in format \"<scheme>://<host>[:<port>]\""
            )
    return origins


def _prices(name: str, raw: str) -> dict[str, Any] | None:
    if not raw:
        return None
    text = raw
    if not raw.lstrip().startswith("{"):
        try:
            text = Path(raw).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"{name}={raw!r}: must be inline JSON or the path of a readable JSON file"
                f" ({exc.strerror})"
            ) from exc
    try:
        table = json.loads(text)
    except ValueError as exc:
        raise ConfigError(
            f"{name}: must be JSON like {{\"gpt-4o\": {{\"input\": 2.5, \"output\": 10}}}}"
        ) from exc
    if not isinstance(table, dict) or not all(
        isinstance(v, dict)
        and isinstance(v.get("input"), int | float)
        and isinstance(v.get("output"), int | float)
        for v in table.values()
    ):
        raise ConfigError(
            f"{name}: every model must map to {{\"input\": <USD per 1M>, \"output\": <USD per 1M>}}"
        )
    return table


@dataclass(frozen=True, slots=True)
class Setting:
    """One configuration variable."""

    env: str
    field: str
    default: str
    parse: Callable[[str, str], Any]
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("DATABASE_URL", "database_url", "sqlite:///./turngate.db", _database_url,
            "Database: the embedded SQLite file, or postgresql://... for production."),
    Setting("TURNGATE_DEFAULT_MODEL", "default_model", "scripted", _model,
            "Model used when a turn names none, as \"<adapter>:<model>\"."),
    Setting("OPENAI_BASE_URL", "openai_base_url", "https://api.openai.com/v1", _http_url,
            "OpenAI-compatible endpoint, including /v1 (OpenAI, vLLM, Ollama, llama.cpp)."),
    Setting("OPENAI_API_KEY", "openai_api_key", "", _secret,
            "Key for the openai adapter; never logged."),
    Setting("ANTHROPIC_BASE_URL", "anthropic_base_url", "https://api.anthropic.com", _http_url,
            "Anthropic Messages API endpoint, without /v1."),
    Setting("ANTHROPIC_API_KEY", "anthropic_api_key", "", _secret,
            "Key for the anthropic adapter; never logged."),
    Setting("TURNGATE_ON_DISCONNECT", "on_disconnect", "grace",
            _choice("grace", "cancel", "continue"),
            "When the last reader leaves mid-stream: go on for the grace period and cancel "
            "unless a reader comes back (grace), cancel at once, or continue to the end."),
    Setting("TURNGATE_DISCONNECT_GRACE_SECONDS", "disconnect_grace_seconds", "5",
            _non_negative_float,
            "Under grace: how long a turn with no reader goes on before it is cancelled."),
    Setting("TURNGATE_CHECKPOINT_SECONDS", "checkpoint_seconds", "2", _positive_float,
            "Interval at which a streaming reply's partial content is saved."),
    Setting("TURNGATE_LEASE_SECONDS", "lease_seconds", "15", _positive_float,
            "How long a generating process's claim on a turn lasts without renewal; after "
            "it expires the turn is marked interrupted."),
    Setting("TURNGATE_FINALIZE_TIMEOUT", "finalize_timeout", "5", _positive_float,
            "Deadline of each database statement, and of each attempt of a turn's final "
            "write (a failed one is retried until it lands)."),
    Setting("TURNGATE_SEND_TIMEOUT", "send_timeout", "10", _positive_float,
            "A client that accepts no bytes for this long is dropped (on Linux counted "
            "from when it stopped taking bytes, however much the server has buffered)."),
    Setting("TURNGATE_HEADER_TIMEOUT", "header_timeout", "10", _positive_float,
            "A connection must send its whole request head (request line and headers) "
            "within this many seconds, else 408 and close."),
    Setting("TURNGATE_MAX_HEADER_BYTES", "max_header_bytes", str(32 * 1024), _positive_int,
            "Largest request head (request line and headers), in bytes (431 beyond it)."),
    Setting("TURNGATE_MAX_PENDING_CONNECTIONS", "max_pending_connections", "1024",
            _positive_int,
            "Most connections still sending their request head; one more closes the "
            "oldest of them."),
    Setting("TURNGATE_PING_SECONDS", "ping_seconds", "15", _positive_float,
            "Interval of keep-alive comments on idle streams."),
    Setting("TURNGATE_SHUTDOWN_GRACE_SECONDS", "shutdown_grace_seconds", "10", _non_negative_float,
            "On SIGTERM, how long running turns may finish before they are finalized "
            "as interrupted."),
    Setting("TURNGATE_RELAY_RETENTION_SECONDS", "relay_retention_seconds", "60",
            _non_negative_float,
            "How long a finished turn's events stay in memory for attach and resume."),
    Setting("TURNGATE_HISTORY_MESSAGES", "history_messages", "200", _positive_int,
            "Most recent earlier messages of a thread sent to the model with a new turn."),
    Setting("TURNGATE_DB_POOL_SIZE", "db_pool_size", "10", _positive_int,
            "PostgreSQL connections per process (asyncpg pool size); operations "
            "beyond it queue in arrival order."),
    Setting("TURNGATE_MAX_TEXT_CHARS", "max_text_chars", "100000", _positive_int,
            "Longest accepted user text, in characters."),
    Setting("TURNGATE_MAX_ID_CHARS", "max_id_chars", "128", _positive_int,
            "Longest accepted thread id and turn_id."),
    Setting("TURNGATE_MAX_IMAGES", "max_images", "4", _positive_int,
            "Most images in one turn."),
    Setting("TURNGATE_MAX_IMAGE_BYTES", "max_image_bytes", str(8 * 1024 * 1024), _positive_int,
            "Largest decoded image, in bytes."),
    Setting("TURNGATE_MAX_BODY_BYTES", "max_body_bytes", str(48 * 1024 * 1024), _positive_int,
            "Largest request body, in bytes (413 beyond it)."),
    Setting("TURNGATE_MAX_STREAMS_PER_USER", "max_streams_per_user", "16", _positive_int,
            "Concurrent generating turns per user (429 beyond it)."),
    Setting("TURNGATE_RATE_LIMIT_PER_MINUTE", "rate_limit_per_minute", "600", _positive_int,
            "Requests per minute per user (429 beyond it)."),
    Setting("TURNGATE_CORS_ORIGINS", "cors_origins", "", _origins,
            "Comma-separated origins allowed to call the API from a browser (\"*\" for any)."),
    Setting("TURNGATE_PRICES", "prices", "", _prices,
            "Price table: inline JSON or a JSON file path, "
            "{\"<model>\": {\"input\": USD per 1M, \"output\": USD per 1M}}."),
    Setting("TURNGATE_LOG_FORMAT", "log_format", "text", _choice("text", "json"),
            "Log lines as readable text or as JSON."),
    Setting("TURNGATE_LOG_LEVEL", "log_level", "info", _choice("debug", "info", "warning", "error"),
            "Lowest log level written."),
    Setting("TURNGATE_LOG_CONTENT", "log_content", "false", _bool,
            "Include message content in debug logs (off by default)."),
    Setting("REDIS_URL", "redis_url", "", _redis_url,
            "Redis for several replicas (needs PostgreSQL); unset for one process."),
    Setting("TURNGATE_MCP_CONFIG", "mcp_config", "", load_config,
            "MCP servers whose tools models may call: a JSON file path or inline JSON, "
            "{\"mcpServers\": {...}} (docs/API.md, \"Tools (MCP)\"); unset for none."),
    Setting("TURNGATE_MAX_STEPS", "max_steps", "10", _positive_int,
            "Most model calls in one turn (each tool round is one more)."),
    Setting("TURNGATE_TITLE_MODEL", "title_model", "", _optional_model,
            "Model that titles a new thread after its first turn, as \"<adapter>:<model>\"; "
            "unset titles it with the first words of the user's text."),
)


@dataclass(frozen=True)
class Settings:
    """The validated configuration of one gateway process."""

    database_url: str = "sqlite:///./turngate.db"
    default_model: str = "scripted"
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: str | None = field(default=None, repr=False)
    anthropic_base_url: str = "https://api.anthropic.com"
    anthropic_api_key: str | None = field(default=None, repr=False)
    on_disconnect: str = "grace"
    disconnect_grace_seconds: float = 5.0
    checkpoint_seconds: float = 2.0
    lease_seconds: float = 15.0
    finalize_timeout: float = 5.0
    send_timeout: float = 10.0
    header_timeout: float = 10.0
    max_header_bytes: int = 32 * 1024
    max_pending_connections: int = 1024
    ping_seconds: float = 15.0
    shutdown_grace_seconds: float = 10.0
    relay_retention_seconds: float = 60.0
    history_messages: int = 200
    db_pool_size: int = 10
    max_text_chars: int = 100_000
    max_id_chars: int = 128
    max_images: int = 4
    max_image_bytes: int = 8 * 1024 * 1024
    max_body_bytes: int = 48 * 1024 * 1024
    max_streams_per_user: int = 16
    rate_limit_per_minute: int = 600
    cors_origins: tuple[str, ...] = ()
    prices: dict[str, Any] | None = None
    log_format: str = "text"
    log_level: str = "info"
    log_content: bool = False
    redis_url: str | None = None
    mcp_config: McpConfig | None = None
    max_steps: int = 10
    title_model: str | None = None
    env: Mapping[str, str] | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read and validate every setting; raise ``ConfigError`` on the first bad one."""
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            raw = env.get(setting.env, setting.default)
            values[setting.field] = setting.parse(setting.env, raw)
        values.update(overrides)
        settings = cls(env=env, **values)
        if settings.lease_seconds <= settings.checkpoint_seconds:
            raise ConfigError(
                f"TURNGATE_LEASE_SECONDS={settings.lease_seconds:g}: must be greater than "
                f"TURNGATE_CHECKPOINT_SECONDS={settings.checkpoint_seconds:g}, "
                "since checkpoints renew the lease"
            )
        if settings.redis_url and not settings.database_url.startswith(("postgres",)):
            raise ConfigError(
                f"REDIS_URL is set but DATABASE_URL={settings.database_url!r} is not PostgreSQL: "
                "several replicas need a shared PostgreSQL database"
            )
        return settings

    @property
    def environ(self) -> Mapping[str, str]:
        """The environment the settings came from (third-party adapters read their own
        settings from it; the built-in ones are given theirs, see ``gateway.app``)."""
        return self.env if self.env is not None else os.environ


def settings_help() -> str:
    """A text table of every setting, for ``turngate serve --help``."""
    lines = []
    for s in SETTINGS:
        lines.append(f"  {s.env:<34} default {s.default or '(unset)'!s}\n      {s.help}")
    return "\n".join(lines)


def settings_markdown() -> str:
    """The README's configuration table (``python -m gateway.ops.settings`` prints it)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for s in SETTINGS:
        default = f"`{cell(s.default)}`" if s.default else "(unset)"
        rows.append(f"| `{s.env}` | {default} | {cell(s.help)} |")
    return "\n".join(rows) + "\n"


assert {s.field for s in SETTINGS} <= {f.name for f in fields(Settings)}

__all__ = ["SETTINGS", "Setting", "Settings", "settings_help", "settings_markdown"]

if __name__ == "__main__":
    import sys

    sys.stdout.write(settings_markdown())
