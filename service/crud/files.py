"""Dataset files: stored only after their whole content validated."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.crud.pagination import page
from service.security import looks_like_id
from service.tables import TERMINAL_STATUSES, File, Job


def create_file(session: Session, *, file_id: str, tenant_id: str, purpose: str, filename: str, size: int, rows: int, sha256: str, path: str) -> File:
    record = File(id=file_id, tenant_id=tenant_id, purpose=purpose, filename=filename, bytes=size, rows=rows, sha256=sha256, path=path, status="processed")
    session.add(record)
    session.commit()
    return record


def get_file(session: Session, *, tenant_id: str, file_id: str) -> File | None:
    if not looks_like_id(file_id, "file"):
        return None
    return session.scalar(select(File).where(File.id == file_id, File.tenant_id == tenant_id))


def list_files(session: Session, *, tenant_id: str, purpose: str | None, after: str | None, limit: int) -> tuple[list[File], bool]:
    query = select(File).where(File.tenant_id == tenant_id)
    if purpose:
        query = query.where(File.purpose == purpose)
    return page(session, query=query, model=File, after=after, limit=limit, tenant_id=tenant_id)


def active_jobs_using(session: Session, *, tenant_id: str, file_id: str) -> list[str]:
    """Ids of unfinished jobs that will read this file (it must not disappear under them)."""
    jobs = session.scalars(select(Job).where(Job.tenant_id == tenant_id, Job.status.not_in(TERMINAL_STATUSES)))
    return [job.id for job in jobs if file_id in (job.inputs or {}).values()]


def delete_file(session: Session, *, record: File) -> None:
    session.delete(record)
    session.commit()
