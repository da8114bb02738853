"""turngate's database layer: the only package that imports ``databases``.

``Store`` does all reads and writes; ``migrate`` / ``schema_status`` manage the
schema (alembic revisions in ``persistence/migrations``). Everything other
packages use is exported here; the modules with a leading underscore are this
package's own.
"""

from persistence._accounts import KEY_SECRET_LEN, split_key
from persistence._base import OperationObserver, utcnow_text
from persistence._probe import ProbeResult
from persistence._threads import ThreadIdTaken
from persistence._urls import DEFAULT_URL, display_url, sqlite_path
from persistence.content import build_user_content
from persistence.migrate import SchemaStatus, classify_revision, migrate, schema_status
from persistence.rows import (
    AppendResult,
    FinalizeItem,
    MessageRow,
    ThreadRow,
    TurnContinued,
    TurnOpened,
    TurnRows,
    UsageRecord,
    UsageRow,
)
from persistence.store import Store

__all__ = [
    "DEFAULT_URL",
    "KEY_SECRET_LEN",
    "AppendResult",
    "FinalizeItem",
    "MessageRow",
    "OperationObserver",
    "ProbeResult",
    "SchemaStatus",
    "Store",
    "ThreadIdTaken",
    "ThreadRow",
    "TurnContinued",
    "TurnOpened",
    "TurnRows",
    "UsageRecord",
    "UsageRow",
    "build_user_content",
    "classify_revision",
    "display_url",
    "migrate",
    "schema_status",
    "split_key",
    "sqlite_path",
    "utcnow_text",
]
