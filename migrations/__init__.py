"""Alembic migrations: the only way the qdpo schema is created or changed (Postgres and SQLite alike)."""
