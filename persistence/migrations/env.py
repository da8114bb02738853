"""Alembic environment: runs on the connection ``persistence.migrate`` hands over.

No ``alembic.ini``: ``persistence/migrate.py`` builds the configuration in code
and puts an open (async-engine, ``run_sync``) connection into
``config.attributes["connection"]``.
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
