"""A regenerated reply is kept as ``superseded``, outside the one-row-per-turn index.

Regenerate writes a new assistant row for the same turn and keeps the old one (and
its usage row) with status ``superseded``; the unique index over
``(thread_id, turn_id, role)`` therefore covers only rows that are not superseded.

Revision ID: 0003_superseded_replies
Revises: 0002_event_map
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_superseded_replies"
down_revision = "0002_event_map"
branch_labels = None
depends_on = None

_CURRENT = "turn_id IS NOT NULL AND status <> 'superseded'"
_ANY = "turn_id IS NOT NULL"


def _turn_index(where: str) -> None:
    op.drop_index("uq_messages_thread_turn_role", table_name="messages")
    op.create_index(
        "uq_messages_thread_turn_role",
        "messages",
        ["thread_id", "turn_id", "role"],
        unique=True,
        postgresql_where=sa.text(where),
        sqlite_where=sa.text(where),
    )


def upgrade() -> None:
    _turn_index(_CURRENT)


def downgrade() -> None:
    op.execute("DELETE FROM messages WHERE status = 'superseded'")
    _turn_index(_ANY)
