"""Alembic environment: the database URL comes from the deployment's QDPO_* settings.

`qdpo migrate` (or `alembic upgrade head` in the repository) runs these migrations; a caller may
pass a URL explicitly through `config.attributes["database_url"]` (the tests do).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import event

from service.config import get_settings
from service.db import make_engine
from service.tables import Base

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    return config.attributes.get("database_url") or get_settings().resolved_database_url


def run_migrations_offline() -> None:
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def _sqlite_foreign_keys_off(dbapi_connection, _record) -> None:
    # SQLite rebuilds a table to alter it (batch mode): with foreign keys on, dropping the old `jobs`
    # would cascade and delete every event, metric and checkpoint. The rebuild keeps the data intact.
    dbapi_connection.execute("PRAGMA foreign_keys=OFF")


def run_migrations_online() -> None:
    engine = make_engine(database_url(), pooled=False)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_foreign_keys_off)
    with engine.connect() as connection:
        # render_as_batch lets the same ALTERs run on SQLite, which cannot alter columns in place.
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
