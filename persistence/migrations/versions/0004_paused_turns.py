"""messages.resume_with: what a paused reply (``requires_action``) continues with.

A JSON object written when a turn pauses for a person's approval or a client-side
tool's output: ``{"model": <model string>, "clientTools": [{"name", "description",
"inputSchema"}]}``, so that the continuation calls the same model with the same
tools. NULL for every other row.

Revision ID: 0004_paused_turns
Revises: 0003_superseded_replies
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_paused_turns"
down_revision = "0003_superseded_replies"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain text on both databases: only the gateway reads it, never a query.
    op.add_column("messages", sa.Column("resume_with", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("resume_with")
