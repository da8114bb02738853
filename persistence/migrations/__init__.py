"""Alembic migrations of turngate's schema (configured in code, no alembic.ini)."""
