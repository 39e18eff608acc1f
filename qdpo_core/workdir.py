"""A run's work directory: which spec it belongs to, and which stages have finished.

    spec.json              the spec (and the sha256 of its input files) this directory belongs to
    stages/<stage>.json    completion marker + the stage's summary; a stage whose marker exists is skipped

Markers are written to a temporary file and renamed, so a crash leaves a stage either done or not.
"""

from __future__ import annotations

import json
from pathlib import Path

from qdpo_core.config import INPUT_FILE_FIELDS, PipelineSpec
from qdpo_core.errors import SpecError


class WorkDir:
    def __init__(self, root: Path):
        self.root = Path(root)

    def claim(self, spec: PipelineSpec) -> None:
        """Bind the directory to this spec; a resume must bring the same settings and input files."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "spec.json"
        spec_dict = spec.to_dict()
        wanted = {"settings": comparable(spec_dict), "inputs": input_hashes(spec_dict)}
        if path.is_file():
            stored = json.loads(path.read_text())
            if {"settings": comparable(stored["spec"]), "inputs": stored["inputs_sha256"]} != wanted:
                raise SpecError(
                    "workdir: the directory holds a run of a different spec or different input files; use a new directory to start over", param="workdir"
                )
        else:
            path.write_text(json.dumps({"spec": spec_dict, "inputs_sha256": wanted["inputs"]}, indent=1))

    def marker(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"

    def done(self, stage: str) -> dict | None:
        """The summary of a finished stage, or None."""
        path = self.marker(stage)
        return json.loads(path.read_text()) if path.is_file() else None

    def finish(self, stage: str, summary: dict) -> None:
        path = self.marker(stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(path)


def comparable(spec_dict: dict) -> dict:
    """Spec fields that must match to resume: all but the device and input file paths."""
    result = json.loads(json.dumps(spec_dict))
    result["model"].pop("device", None)
    # A resume compares input files by content, not path: another worker may mount the store elsewhere.
    for section, key in INPUT_FILE_FIELDS.values():
        result[section].pop(key, None)
    return result


def input_hashes(spec_dict: dict) -> dict:
    from qdpo_core.export import sha256_file

    hashes = {}
    for section, key in INPUT_FILE_FIELDS.values():
        value = spec_dict[section].get(key)
        if value:
            path = Path(value)
            hashes[f"{section}.{key}"] = sha256_file(path) if path.is_file() else None
    return hashes
