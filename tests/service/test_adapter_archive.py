"""What a client downloads names no server path: the adapter archive of a real finished job,
every file of it scanned byte by byte (JSON, markdown and the safetensors header alike)."""

from __future__ import annotations

import copy
import json
import os
import struct
import tarfile
from pathlib import Path

import pytest

from .conftest import TINY_JOB
from .helpers import PROMPTS, write_jsonl

pytestmark = pytest.mark.service


def _server_paths(deployment, tiny_model_dir: Path, tmp_path_factory) -> set[str]:
    settings = deployment.settings
    cache = Path(os.environ.get("QDPO_MODEL_CACHE", Path.home() / ".cache" / "qdpo" / "models"))
    candidates = {
        settings.resolved_artifact_dir,
        Path(settings.var_dir),
        cache,
        cache.parent,  # ~/.cache/qdpo
        tiny_model_dir,
        tmp_path_factory.getbasetemp(),  # the common root of every directory this test session made
    }
    paths = set()
    for path in candidates:
        paths |= {str(path), str(Path(path).resolve()), str(Path(path).absolute())}
    return paths


def _absolute_strings(value, where: str = "") -> list[str]:
    """Every string in a JSON document that looks like an absolute path, with where it sits."""
    if isinstance(value, dict):
        return [hit for key, item in value.items() for hit in _absolute_strings(item, f"{where}.{key}")]
    if isinstance(value, list):
        return [hit for index, item in enumerate(value) for hit in _absolute_strings(item, f"{where}[{index}]")]
    if isinstance(value, str) and (value.startswith(("/", "~", "\\")) or value[1:3] in (":\\", ":/")):
        return [f"{where}: {value}"]
    return []


def test_the_downloaded_adapter_names_no_server_path(worker_deployment, tiny_model_dir, tmp_path, tmp_path_factory):
    client = worker_deployment.client()
    prompts = client.files.upload(write_jsonl(tmp_path / "prompts.jsonl", *PROMPTS), "prompts")
    held_out = client.files.upload(write_jsonl(tmp_path / "held_out.jsonl", *PROMPTS[:3]), "prompts")
    body = copy.deepcopy(TINY_JOB)
    body["dataset"] = {"file_id": prompts.id, "eval_file_id": held_out.id}
    body["method"]["hyperparameters"]["checkpoint_every"] = 1  # the export is a training checkpoint, not the identity adapter
    job = client.jobs.create(**body, suffix="paths")
    job = client.jobs.wait(job.id, poll_interval=0.5, timeout=240, progress=False)
    archive = client.jobs.download_adapter(job.id, tmp_path / "download", extract=False)

    forbidden = _server_paths(worker_deployment, tiny_model_dir, tmp_path_factory)
    scanned = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            assert not member.name.startswith("/") and ".." not in member.name.split("/"), member.name
            if member.isfile():
                scanned[member.name] = tar.extractfile(member).read()
    assert {"manifest.json", "report.json", "report.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(scanned)
    for name, data in scanned.items():
        for path in forbidden:
            assert path.encode() not in data, f"{name} names the server path {path}"

    weights = scanned["adapter/adapter_model.safetensors"]
    (header_size,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8 : 8 + header_size])
    assert not _absolute_strings(header), _absolute_strings(header)

    manifest = json.loads(scanned["manifest.json"])
    assert not _absolute_strings(manifest), _absolute_strings(manifest)
    # input files are named and hashed, so the manifest still says exactly what the adapter was trained on
    assert manifest["inputs"] == {
        "dataset.prompts": {"name": f"{prompts.id}.jsonl", "sha256": prompts.sha256},
        "dataset.eval_prompts": {"name": f"{held_out.id}.jsonl", "sha256": held_out.sha256},
    }
    assert (manifest["spec"]["dataset"]["prompts"], manifest["spec"]["dataset"]["eval_prompts"]) == (f"{prompts.id}.jsonl", f"{held_out.id}.jsonl")
    adapter_config = json.loads(scanned["adapter/adapter_config.json"])
    assert adapter_config["base_model_name_or_path"] == "tiny"  # the registered name, as the job named it
    assert not _absolute_strings(adapter_config), _absolute_strings(adapter_config)
    assert not _absolute_strings(json.loads(scanned["report.json"]))

    # The best checkpoint is what gets exported: the checkpoints themselves name the model the same way.
    from service.storage import ArtifactStore

    with worker_deployment.sessions() as session:
        from service.tables import Job

        tenant_id = session.query(Job).filter_by(id=job.id).one().tenant_id
    workdir = ArtifactStore(worker_deployment.settings.resolved_artifact_dir).workdir(tenant_id, job.id)
    configs = sorted(workdir.rglob("adapter_config.json"))
    assert any("step-" in str(p) for p in configs), configs
    assert {json.loads(p.read_text())["base_model_name_or_path"] for p in configs} == {"tiny"}

    # The manifest alone still rebuilds the quantized base and attaches the adapter.
    from peft import PeftModel

    from qdpo_client._common import extract_and_verify
    from qdpo_core.export import load_aligned

    worker_deployment.settings.register_models()  # "tiny" names the tiny model here as on the worker
    model, tokenizer = load_aligned(extract_and_verify(archive, tmp_path / "unpacked"), device="cpu")
    assert isinstance(model, PeftModel) and model.peft_config["default"].base_model_name_or_path == "tiny"
    assert tokenizer("hello")["input_ids"]
