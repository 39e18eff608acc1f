"""The uploaded files a job reads: which request field names each, where its path goes in the
pipeline spec, and the one function that resolves a job's file ids to stored files.

    resolve_inputs(session, store, tenant_id=…, inputs={"prompts": "file_…"}, method="qdpo")
        → {"prompts": Path(<artifact dir>/files/<tenant>/file_….jsonl)}

The API calls it before a job is stored (does every file exist, with the right purpose?), the
dispatcher before a job is queued and the worker before it runs (is the stored copy unchanged?).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from qdpo_core.config import INPUT_FILE_FIELDS
from service.crud import files as files_crud
from service.errors import InvalidInput, NotFound
from service.storage import ArtifactStore, sha256_of


@dataclass(frozen=True)
class InputFile:
    """An uploaded file a job reads: where its path goes in the spec, and the API field naming it."""

    section: str  # PipelineSpec section the worker writes the file's path into
    key: str  # field in that section
    param: str  # the request field carrying the file id
    purpose: str  # the upload purpose the file must have
    role: str  # what the job uses it for, in error messages


# Keyed by the name stored in Job.inputs; where each path sits in the spec is qdpo_core's to say.
INPUT_FILES = {
    name: InputFile(*INPUT_FILE_FIELDS[name], param, purpose, role)
    for name, (param, purpose, role) in {
        "prompts": ("dataset.file_id", "prompts", "training prompts"),
        "pairs": ("dataset.file_id", "preferences", "method 'dpo'"),
        "eval_prompts": ("dataset.eval_file_id", "prompts", "evaluation prompts"),
        "references": ("method.factuality.references_file_id", "references", "reference passages"),
    }.items()
}


def resolve_inputs(session: Session, store: ArtifactStore, *, tenant_id: str, inputs: dict[str, str], verify_content: bool = False) -> dict[str, Path]:
    """{input name: absolute path} for a job's file ids; raises NotFound / InvalidInput naming the field.

    Every file must exist for this tenant and have the purpose its role needs; with
    `verify_content` the stored copy must also still match the sha256 taken at upload.
    """
    paths: dict[str, Path] = {}
    for name, file_id in inputs.items():
        wanted = INPUT_FILES[name]
        record = files_crud.get_file(session, tenant_id=tenant_id, file_id=file_id)
        if record is None:
            raise NotFound(
                f"{wanted.param}: no file with id {file_id!r} (never uploaded, or deleted); upload it with POST /v1/files", wanted.param, code="file_not_found"
            )
        if record.purpose != wanted.purpose:
            raise InvalidInput(
                f"{wanted.param}: {file_id} is a {record.purpose} file but {wanted.role} needs a {wanted.purpose} file", wanted.param, code="wrong_file_purpose"
            )
        path = store.absolute(record.path)
        if verify_content and (not path.is_file() or sha256_of(path) != record.sha256):
            raise InvalidInput(
                f"{wanted.param}: the stored copy of {file_id} is missing or changed; upload the file again", wanted.param, code="file_corrupted"
            )
        paths[name] = path
    return paths


def spec_with_inputs(spec: dict, paths: dict[str, Path]) -> dict:
    """A copy of a stored spec with the input files' paths written where the pipeline reads them."""
    result = {key: (dict(value) if isinstance(value, dict) else value) for key, value in spec.items()}
    for name, path in paths.items():
        wanted = INPUT_FILES[name]
        result[wanted.section] = {**result.get(wanted.section, {}), wanted.key: str(path)}
    return result
