"""messages.event_map: how a reply's stream was numbered, so a replay from the row
resumes at any ``Last-Event-ID`` of the live stream.

A JSON array with one entry per content part: the lengths (in characters) of the
deltas the part was streamed in. Written with the content by checkpoints and the
final write; NULL for rows written before it or by the legacy append route (their
replay numbers one delta per part, as before).

Revision ID: 0002_event_map
Revises: 0001_initial
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_event_map"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain text on both databases: only the gateway reads it, never a query.
    op.add_column("messages", sa.Column("event_map", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("event_map")
