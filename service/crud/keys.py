"""Tenants and their API keys (created and revoked with `qdpo keys …`)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.security import display_prefix, hash_api_key, new_api_key, new_id
from service.tables import ApiKey, Tenant, utcnow

DEFAULT_TENANT = "default"


def get_or_create_tenant(session: Session, *, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(id=new_id("ten"), name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, *, tenant_name: str, name: str | None = None, key: str | None = None) -> tuple[ApiKey, str]:
    """A new key for the tenant (created if needed). The plaintext is returned once and never stored."""
    tenant = get_or_create_tenant(session, name=tenant_name)
    key = key or new_api_key()
    record = ApiKey(id=new_id("key"), tenant_id=tenant.id, name=name, key_prefix=display_prefix(key), key_hash=hash_api_key(key))
    session.add(record)
    session.commit()
    return record, key


def ensure_key(session: Session, *, key: str, tenant_name: str = DEFAULT_TENANT) -> ApiKey:
    """Make sure `key` authenticates as `tenant_name` (used for a deployment's bootstrap key)."""
    existing = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_api_key(key)))
    if existing is not None:
        return existing
    record, _ = create_key(session, tenant_name=tenant_name, name="bootstrap", key=key)
    return record


def authenticate(session: Session, *, key: str) -> Tenant | None:
    record = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_api_key(key), ApiKey.revoked_at.is_(None)))
    return record.tenant if record is not None else None


def list_keys(session: Session, *, tenant_name: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).join(Tenant).order_by(Tenant.name, ApiKey.created_at)
    if tenant_name:
        query = query.where(Tenant.name == tenant_name)
    return list(session.scalars(query))


def revoke_key(session: Session, *, key_id: str) -> ApiKey | None:
    """Revoke by key id (`key_…`) or by the displayed prefix."""
    record = session.get(ApiKey, key_id) or session.scalar(select(ApiKey).where(ApiKey.key_prefix == key_id))
    if record is not None and record.revoked_at is None:
        record.revoked_at = utcnow()
        session.commit()
    return record


def has_any_key(session: Session) -> bool:
    return session.scalar(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)) is not None
