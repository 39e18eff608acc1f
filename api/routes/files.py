"""/v1/files: upload, list, get, download and delete dataset files."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import PurePath
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse

from api import metrics
from api.core.errors import ApiError
from api.deps import CurrentTenant, SessionDep, SettingsDep, StoreDep
from api.schemas.common import Deleted, Page, error_responses
from api.schemas.files import FilePublic, FilePurpose
from qdpo_core.config import text_problem
from qdpo_core.datasets import parse_lines
from qdpo_core.errors import DataError
from service.crud import files as files_crud
from service.errors import not_found
from service.security import new_id
from service.storage import CHUNK
from service.tables import File as FileRecord

log = logging.getLogger(__name__)
router = APIRouter(prefix="/files", tags=["files"])


def file_public(record: FileRecord) -> FilePublic:
    return FilePublic(
        id=record.id,
        purpose=record.purpose,
        filename=record.filename,
        bytes=record.bytes,
        rows=record.rows,
        sha256=record.sha256,
        created_at=int(record.created_at.timestamp()),
    )


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def stored_filename(name: str | None) -> str:
    """The uploaded file's own name (no directories), or 422 naming `file` when it cannot be stored or sent back."""
    name = PurePath(name or "upload.jsonl").name
    problem = text_problem(name) or ("contains a control character" if _CONTROL.search(name) else None)
    if problem is not None:
        raise ApiError(422, "invalid_filename", f"file: the file name {problem}; rename the file and upload it again", "file")
    return name[:255] or "upload.jsonl"


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "file_too_large",
        f"file: larger than this deployment's limit of {limit:,} bytes; split it or ask the operator to raise QDPO_MAX_UPLOAD_BYTES",
        "file",
    )


@router.post("", status_code=201, response_model=FilePublic, responses=error_responses(401, 413, 422))
def upload_file(
    tenant: CurrentTenant,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="JSONL, one record per line (see the `purpose` for the accepted shapes).")],
    purpose: Annotated[
        FilePurpose,
        Form(
            description="prompts: {'prompt'} or {'messages'} lines; preferences: TRL {'prompt','chosen','rejected'} or OpenAI preference lines; references: {'text', 'title'?} passages for the factuality scorer."
        ),
    ],
) -> FilePublic:
    """Upload a JSONL dataset; it is validated line by line and stored only if every line is valid."""
    filename = stored_filename(file.filename)
    staging = store.staging_file()
    try:
        size, digest = 0, hashlib.sha256()
        with open(staging, "wb") as out:
            while chunk := file.file.read(CHUNK):
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise _too_large(settings.max_upload_bytes)
                digest.update(chunk)
                out.write(chunk)
        with open(staging, "rb") as lines:
            rows = len(parse_lines(lines, purpose))
        file_id = new_id("file")
        relative = store.file_relpath(tenant.id, file_id)
        store.commit(staging, relative)
        try:
            record = files_crud.create_file(
                session,
                file_id=file_id,
                tenant_id=tenant.id,
                purpose=purpose,
                filename=filename,
                size=size,
                rows=rows,
                sha256=digest.hexdigest(),
                path=relative,
            )
        except Exception:
            store.delete(relative)  # no stored file without its row
            raise
    except DataError as exc:
        raise ApiError(422, "invalid_file", f"file: {exc.message}", "file", lines=exc.lines) from exc
    finally:
        staging.unlink(missing_ok=True)
    metrics.FILES_UPLOADED.labels(purpose=purpose).inc()
    return file_public(record)


@router.get("", response_model=Page[FilePublic], responses=error_responses(401, 422))
def list_files(
    tenant: CurrentTenant,
    session: SessionDep,
    purpose: Annotated[FilePurpose | None, Query(description="Only files of this purpose.")] = None,
    after: Annotated[str | None, Query(description="Cursor: the last id of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Page[FilePublic]:
    """List your files, newest first."""
    records, has_more = files_crud.list_files(session, tenant_id=tenant.id, purpose=purpose, after=after, limit=limit)
    return Page[FilePublic](data=[file_public(r) for r in records], has_more=has_more, next_cursor=records[-1].id if has_more else None)


def _get(session, tenant, file_id: str) -> FileRecord:
    record = files_crud.get_file(session, tenant_id=tenant.id, file_id=file_id)
    if record is None:
        raise not_found("file", file_id)
    return record


@router.get("/{file_id}", response_model=FilePublic, responses=error_responses(401, 404))
def get_file(file_id: str, tenant: CurrentTenant, session: SessionDep) -> FilePublic:
    """Get one file's metadata."""
    return file_public(_get(session, tenant, file_id))


@router.get("/{file_id}/content", response_class=FileResponse, responses={200: {"content": {"application/jsonl": {}}}, **error_responses(401, 404)})
def get_file_content(file_id: str, tenant: CurrentTenant, session: SessionDep, store: StoreDep) -> FileResponse:
    """Download a file's content exactly as uploaded."""
    record = _get(session, tenant, file_id)
    return FileResponse(store.absolute(record.path), media_type="application/jsonl", filename=record.filename, headers={"ETag": f'"{record.sha256}"'})


@router.delete("/{file_id}", response_model=Deleted, responses=error_responses(401, 404, 409))
def delete_file(file_id: str, tenant: CurrentTenant, session: SessionDep, store: StoreDep) -> Deleted:
    """Delete a file no unfinished job uses."""
    record = _get(session, tenant, file_id)
    users = files_crud.active_jobs_using(session, tenant_id=tenant.id, file_id=file_id)
    if users:
        raise ApiError(
            409, "file_in_use", f"file_id: {file_id} is an input of unfinished job(s) {', '.join(users)}; cancel them or wait until they finish", "file_id"
        )
    relative = record.path
    files_crud.delete_file(session, record=record)
    store.delete(relative)
    return Deleted(id=file_id, object="file")
