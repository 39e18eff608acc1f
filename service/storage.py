"""The artifact directory shared by the API and the workers.

    <root>/files/<tenant>/<file_id>.jsonl         uploaded datasets (validated before they land here)
    <root>/jobs/<tenant>/<job_id>/work/           the pipeline's resumable work directory
    <root>/jobs/<tenant>/<job_id>/adapter.tar.gz  the downloadable result
    <root>/jobs/<tenant>/<job_id>/report.md       the report as Markdown

Only this class spells that layout; everyone else asks it for a path.

Paths stored in the database are relative to <root>, so the directory can be mounted at a different
place in each container. Everything lands under its final name by rename, never half-written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

CHUNK = 1024 * 1024
ADAPTER_ARCHIVE = "adapter.tar.gz"
REPORT_MARKDOWN = "report.md"


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def absolute(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"artifact path {relative!r} escapes the artifact directory")
        return path

    def file_relpath(self, tenant_id: str, file_id: str) -> str:
        return f"files/{tenant_id}/{file_id}.jsonl"

    def job_relpath(self, tenant_id: str, job_id: str) -> str:
        return f"jobs/{tenant_id}/{job_id}"

    def job_dir(self, tenant_id: str, job_id: str) -> Path:
        return self.absolute(self.job_relpath(tenant_id, job_id))

    def workdir(self, tenant_id: str, job_id: str) -> Path:
        return self.job_dir(tenant_id, job_id) / "work"

    def adapter_relpath(self, tenant_id: str, job_id: str) -> str:
        return f"{self.job_relpath(tenant_id, job_id)}/{ADAPTER_ARCHIVE}"

    def report_markdown(self, tenant_id: str, job_id: str) -> Path:
        return self.job_dir(tenant_id, job_id) / REPORT_MARKDOWN

    def staging_file(self) -> Path:
        """A temporary file inside the artifact volume, so the final move is an atomic rename."""
        staging = self.root / "tmp"
        staging.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=staging, suffix=".part")
        os.close(handle)
        return Path(name)

    def commit(self, staging: Path, relative: str) -> Path:
        final = self.absolute(relative)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, final)
        return final

    def delete(self, relative: str) -> None:
        path = self.absolute(relative)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
