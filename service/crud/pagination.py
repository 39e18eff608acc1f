"""Cursor pagination over tables with an integer `pk`: newest first, `after=<public id>`."""

from __future__ import annotations

from functools import cache

from sqlalchemy import Select, bindparam, select
from sqlalchemy.orm import Session

from service.errors import InvalidInput
from service.security import looks_like_id


def cursor_pk(session: Session, *, model, after: str, tenant_id: str) -> int:
    """The pk of the row `after` names: the next page has the rows of smaller pk."""
    query = cursor_query(model=model, after=after, tenant_id=tenant_id)
    return checked_cursor(session.scalar(*query) if query is not None else None, after)


def cursor_query(*, model, after: str, tenant_id: str) -> tuple[Select, dict] | None:
    """The statement whose one value is the pk of the row `after` names, and its parameters (None: not an id at all)."""
    return (_cursor_statement(model), {"after": after, "tenant_id": tenant_id}) if looks_like_id(after) else None


@cache
def _cursor_statement(model) -> Select:
    """One statement per table, its values bound at execution (built once, not per request)."""
    return select(model.pk).where(model.id == bindparam("after"), model.tenant_id == bindparam("tenant_id"))


def checked_cursor(pk: int | None, after: str) -> int:
    """The cursor's pk, or the 422 for a cursor that names no row of this list."""
    if pk is None:
        raise InvalidInput(f"after: {after[:80]!r} is not an id from a previous page of this list", "after", code="invalid_cursor")
    return pk


def page(session: Session, *, query: Select, model, after: str | None, limit: int, tenant_id: str) -> tuple[list, bool]:
    """One page of `query` (already filtered to the tenant), ordered by pk descending."""
    if after is not None:
        query = query.where(model.pk < cursor_pk(session, model=model, after=after, tenant_id=tenant_id))
    return split_page(session.scalars(query.order_by(model.pk.desc()).limit(limit + 1)), limit)


def split_page(rows, limit: int) -> tuple[list, bool]:
    """The page and whether there is more, from a query that asked for `limit + 1` rows."""
    rows = list(rows)
    return rows[:limit], len(rows) > limit
