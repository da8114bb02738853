"""Initial schema: users, api_keys, threads, messages, token_usage.

Revision ID: 0001_initial
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None

# BIGINT on PostgreSQL; on SQLite only "INTEGER PRIMARY KEY" is the autoincrementing rowid.
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# jsonb on PostgreSQL; plain TEXT on SQLite (a column declared JSON would get NUMERIC affinity).
_JSON = sa.Text().with_variant(postgresql.JSONB(), "postgresql")
# timestamptz on PostgreSQL; ISO-8601 UTC text on SQLite, always written by the store in one
# fixed-width format so that text order is time order.
_TS = sa.Text().with_variant(sa.DateTime(timezone=True), "postgresql")


def _now() -> sa.TextClause | None:
    # SQLite rows always get their timestamps from the store; PostgreSQL has a real clock default.
    return sa.text("now()") if op.get_bind().dialect.name == "postgresql" else None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("name", sa.Text(), nullable=False, unique=True),
        sa.Column("created_at", _TS, nullable=False, server_default=_now()),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("user_id", _ID, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("prefix", sa.Text(), nullable=False, unique=True),
        sa.Column("secret_hash", sa.Text(), nullable=False),
        sa.Column("created_at", _TS, nullable=False, server_default=_now()),
        sa.Column("revoked_at", _TS, nullable=True),
    )
    op.create_table(
        "threads",
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column("owner_id", _ID, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("title", sa.Text(), nullable=True),
        sa.Column("created_at", _TS, nullable=False, server_default=_now()),
        sa.Column("updated_at", _TS, nullable=False, server_default=_now()),
    )
    op.create_index("ix_threads_owner_updated", "threads", ["owner_id", "updated_at"])
    op.create_table(
        "messages",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("thread_id", sa.Text(), sa.ForeignKey("threads.id"), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("content", _JSON, nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("author_id", _ID, nullable=True),
        sa.Column("turn_id", sa.Text(), nullable=True),
        sa.Column("lease_owner", sa.Text(), nullable=True),
        sa.Column("lease_expires_at", _TS, nullable=True),
        sa.Column("created_at", _TS, nullable=False, server_default=_now()),
        sa.Column("updated_at", _TS, nullable=False, server_default=_now()),
    )
    op.create_index("ix_messages_thread_id", "messages", ["thread_id", "id"])
    op.create_index(
        "uq_messages_thread_turn_role",
        "messages",
        ["thread_id", "turn_id", "role"],
        unique=True,
        postgresql_where=sa.text("turn_id IS NOT NULL"),
        sqlite_where=sa.text("turn_id IS NOT NULL"),
    )
    # One streaming turn per thread, enforced by the database across processes.
    op.create_index(
        "uq_messages_thread_streaming",
        "messages",
        ["thread_id"],
        unique=True,
        postgresql_where=sa.text("status = 'streaming'"),
        sqlite_where=sa.text("status = 'streaming'"),
    )
    # No foreign keys on token_usage on purpose: it is the audit trail and must outlive
    # whatever it points at.
    op.create_table(
        "token_usage",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("usage_type", sa.Text(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("total_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_micros", sa.BigInteger(), nullable=False),
        sa.Column("model_breakdown", _JSON, nullable=False),
        sa.Column("call_details", _JSON, nullable=False),
        sa.Column("estimated", sa.Boolean(), nullable=False),
        sa.Column("thread_id", sa.Text(), nullable=False),
        sa.Column("message_id", _ID, nullable=True),
        sa.Column("user_id", _ID, nullable=False),
        sa.Column("created_at", _TS, nullable=False, server_default=_now()),
    )
    op.create_index(
        "uq_token_usage_message_id",
        "token_usage",
        ["message_id"],
        unique=True,
        postgresql_where=sa.text("message_id IS NOT NULL"),
        sqlite_where=sa.text("message_id IS NOT NULL"),
    )
    op.create_index("ix_token_usage_user", "token_usage", ["user_id", "id"])


def downgrade() -> None:
    op.drop_table("token_usage")
    op.drop_table("messages")
    op.drop_table("threads")
    op.drop_table("api_keys")
    op.drop_table("users")
