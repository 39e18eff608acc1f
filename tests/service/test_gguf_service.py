"""GGUF jobs through the service: refused at creation when the model cannot have them, and a real
Q4_0 job on the bundled SmolLM2 whose adapter.gguf and model-Q4_0.gguf the client downloads,
sha256-checked against the manifest, with the base model kept out of the adapter archive."""

from __future__ import annotations

import hashlib
import json
import secrets
import tarfile

import pytest

from .helpers import error_of, raw

pytestmark = pytest.mark.service

GGUF_JOB = {
    "model": "smollm2-135m-instruct",
    "quantization": {"method": "gguf", "type": "Q4_0"},
    "dataset": {"max_train_prompts": 2, "max_eval_prompts": 2},
    "generation": {"max_new_tokens": 4},
    "eval": {"max_new_tokens": 4},
    "method": {"type": "kd", "hyperparameters": {"epochs": 0, "init": "identity", "lora_rank": 4}},
}


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"model": "tiny", "quantization": {"method": "gguf", "type": "Q4_0"}}, "quantization.method", "has none"),
        ({"model": "smollm2-135m-instruct", "quantization": {"method": "gguf"}}, "quantization.type", "nothing to repair"),
        ({"model": "smollm2-135m-instruct", "quantization": {"method": "gguf", "type": "Q4_K_M"}}, "quantization.type", ""),
        ({"model": "tiny", "quantization": {"method": "nf4", "type": "Q4_0"}}, "quantization.type", "only method 'gguf'"),
    ],
)
def test_gguf_jobs_the_model_cannot_have_are_refused_at_creation(worker_deployment, body, param, says):
    with raw(worker_deployment, worker_deployment.new_key(f"t-{secrets.token_hex(4)}")) as http:  # this deployment offers "tiny"
        error = error_of(http.post("/v1/jobs", json=body), 422)
        assert error["param"] == param and says in error["message"]
        assert http.get("/v1/jobs").json()["data"] == []  # nothing was stored


def test_gguf_files_of_an_unfinished_or_unknown_job_are_not_served(api_deployment, tenant_key):
    with raw(api_deployment, tenant_key) as http:
        job = http.post("/v1/jobs", json=GGUF_JOB).json()  # stays queued: no worker reads this deployment's queue
        assert error_of(http.get(f"/v1/jobs/{job['id']}/gguf/adapter"), 409)["code"] == "gguf_not_ready"
        assert error_of(http.get("/v1/jobs/job_doesnotexist00000000/gguf/model"), 404)["param"] == "job_id"
        assert error_of(http.get(f"/v1/jobs/{job['id']}/gguf/weights"), 422)["param"] == "kind"


def test_a_gguf_job_exports_the_llama_cpp_pair_and_the_client_downloads_it(worker_deployment, tmp_path):
    client = worker_deployment.client()
    job = client.jobs.create(**GGUF_JOB, suffix="gguf")
    job = client.jobs.wait(job.id, poll_interval=0.5, timeout=600, progress=False)
    assert job.status == "succeeded", job.error

    unpacked = client.jobs.download_adapter(job.id, tmp_path / "archive")
    manifest = json.loads((unpacked / "manifest.json").read_text())
    gguf = manifest["gguf"]
    assert gguf["base"] | {"sha256": None, "bytes": None} == {
        "file": "model-Q4_0.gguf",
        "sha256": None,
        "bytes": None,
        "type": "Q4_0",
        "tensor_types": {"F32": 61, "Q4_0": 210, "Q8_0": 1},
        "included": True,
    }
    assert gguf["llama_cpp"] == "llama-cli -m model-Q4_0.gguf --lora adapter.gguf"
    # the archive holds the adapter in both formats, not the 90 MB base model
    with tarfile.open(tmp_path / "archive" / f"{job.id}-adapter.tar.gz") as tar:
        names = set(tar.getnames())
    assert "adapter.gguf" in names and "adapter/adapter_model.safetensors" in names and "model-Q4_0.gguf" not in names
    assert manifest["files"]["adapter.gguf"] == gguf["adapter"]["sha256"] == _sha256(unpacked / "adapter.gguf")

    paths = client.jobs.download_gguf(job.id, tmp_path / "gguf")
    assert set(paths) == {"adapter", "model"}
    assert paths["model"].name == "model-Q4_0.gguf" and paths["adapter"].name == "adapter.gguf"
    assert paths["model"].parent == paths["adapter"].parent == tmp_path / "gguf" / job.id
    assert _sha256(paths["model"]) == gguf["base"]["sha256"] and paths["model"].stat().st_size == gguf["base"]["bytes"]
    assert _sha256(paths["adapter"]) == gguf["adapter"]["sha256"]
    assert list(client.jobs.download_gguf(job.id, tmp_path / "only-adapter", model=False)) == ["adapter"]

    # what the client downloads names no server path
    for data in (paths["adapter"].read_bytes(), (unpacked / "manifest.json").read_bytes()):
        for path in (str(worker_deployment.settings.resolved_artifact_dir), str(tmp_path.parent)):
            assert path.encode() not in data
