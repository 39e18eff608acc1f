"""Pieces the sync and async clients share: request bodies, SSE parsing, archive checks."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tarfile
from pathlib import Path
from typing import Any

from qdpo_client.errors import ChecksumMismatch

CHUNK = 1 << 20


def job_body(model: str, **sections: Any) -> dict:
    """The POST /v1/jobs body; sections left as None are omitted (the server's defaults apply)."""
    return {"model": model, **{key: value for key, value in sections.items() if value is not None}}


def webhook_body(url: str, events: list[str] | None, description: str | None) -> dict:
    """The POST /v1/webhooks body; events left as None take the server's default (the terminal job states)."""
    return {"url": url, **{key: value for key, value in (("events", events), ("description", description)) if value is not None}}


def idempotency_headers(key: str | None) -> dict:
    return {"Idempotency-Key": key or f"qdpo-client-{secrets.token_hex(16)}"}


def page_params(**params: Any) -> dict:
    return {key: value for key, value in params.items() if value is not None}


class SSEParser:
    """Turns the lines of a text/event-stream into (event, data, id) triples."""

    def __init__(self):
        self.event, self.data, self.id = None, [], None

    def feed(self, line: str):
        if line == "":
            if not self.data:
                self.event = None
                return None
            message = (self.event or "message", "\n".join(self.data), self.id)
            self.event, self.data = None, []
            return message
        if line.startswith(":"):
            return None  # a keep-alive comment
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        elif name == "id":
            self.id = value
        return None


def expected_sha256(headers, job_sha256: str | None) -> str | None:
    announced = headers.get("x-content-sha256") or (headers.get("etag") or "").strip('"') or None
    if job_sha256 and announced and job_sha256 != announced:
        raise ChecksumMismatch(f"the server announced two different digests ({announced} vs {job_sha256})")
    return job_sha256 or announced


def attachment_name(headers, default: str) -> str:
    """The file name a download announces (Content-Disposition), reduced to a bare name; `default` when there is none."""
    import re

    match = re.search(r'filename="?([^";]+)"?', headers.get("content-disposition", ""))
    name = Path(match.group(1)).name if match else ""
    return name if name and name not in (".", "..") else default


class HashingWriter:
    """Writes a download to `<target>.part` while hashing it; `finish` verifies and renames."""

    def __init__(self, target: Path):
        self.target = Path(target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.target.with_name(self.target.name + ".part")
        self.handle = open(self.partial, "wb")
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.handle.write(chunk)
        self.digest.update(chunk)
        self.size += len(chunk)

    def finish(self, expected: str | None, expected_size: int | None) -> Path:
        self.handle.close()
        actual = self.digest.hexdigest()
        if (expected and actual != expected) or (expected_size is not None and self.size != expected_size):
            self.partial.unlink(missing_ok=True)
            raise ChecksumMismatch(
                f"{self.target.name}: got sha256 {actual} ({self.size} bytes), expected {expected} ({expected_size} bytes); nothing was kept"
            )
        os.replace(self.partial, self.target)
        return self.target

    def abort(self) -> None:
        self.handle.close()
        self.partial.unlink(missing_ok=True)


def extract_and_verify(archive: Path, target_dir: Path) -> Path:
    """Unpack the adapter archive and check every file against manifest.json's sha256."""
    target_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(target_dir, filter="data")  # refuses absolute paths, links out, devices
    manifest_path = target_dir / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        for name, expected in (manifest.get("files") or {}).items():
            digest = hashlib.sha256()
            with open(target_dir / name, "rb") as handle:
                for block in iter(lambda: handle.read(CHUNK), b""):
                    digest.update(block)
            if digest.hexdigest() != expected:
                raise ChecksumMismatch(f"{name}: sha256 does not match manifest.json")
    return target_dir
