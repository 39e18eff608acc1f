"""Pack a pipeline's export directory into the one archive clients download.

The archive is reproducible (sorted entries, zeroed times and owners), so the same adapter always
has the same sha256, and it lands under its final name only when complete.
"""

from __future__ import annotations

import gzip
import os
import tarfile
from pathlib import Path

from service.storage import sha256_of


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o755 if info.isdir() else 0o644
    return info


def build_archive(export_dir: Path, target: Path, skip: tuple[str, ...] = ()) -> tuple[int, str]:
    """Write export_dir's contents to target (tar.gz), but the files named in `skip`; return (bytes, sha256).

    A GGUF job's quantized base model (model-<TYPE>.gguf) is skipped: it is served on its own.
    """
    export_dir, target = Path(export_dir), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".part")
    with open(partial, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as zipped, tarfile.open(fileobj=zipped, mode="w") as tar:
        for path in sorted(export_dir.rglob("*")):
            if path.relative_to(export_dir).as_posix() in skip:
                continue
            tar.add(path, arcname=path.relative_to(export_dir).as_posix(), recursive=False, filter=_normalise)
    os.replace(partial, target)
    return target.stat().st_size, sha256_of(target)
