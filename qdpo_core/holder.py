"""The models one run needs — tokenizer, FP teacher, quantized student, LoRA policy — loaded on first use, once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qdpo_core.config import PipelineSpec


class ModelHolder:
    """Loads the tokenizer, FP teacher, quantized student and LoRA policy on first use, once."""

    def __init__(self, spec: PipelineSpec):
        self.spec = spec
        self._model_dir: Path | None = None
        # transformers objects, loaded on first use
        self._tokenizer: Any = None
        self._teacher: Any = None
        self._student: Any = None
        self.policy = None
        self._quant_info = None
        self._device: str | None = None
        self._dtype: str | None = None

    @property
    def device(self) -> str:
        if self._device is None:
            from qdpo_core.models import resolve_device

            self._device = resolve_device(self.spec.model.device)
        return self._device

    @property
    def dtype(self) -> str:
        """The compute dtype in use: the spec's, with 'auto' resolved once by measurement."""
        if self._dtype is None:
            from qdpo_core.models import resolve_dtype

            self._dtype = resolve_dtype(self.spec.model.dtype, self.device)
        return self._dtype

    @property
    def model_dir(self) -> Path:
        if self._model_dir is None:
            from qdpo_core.models import resolve_model_dir

            self._model_dir = resolve_model_dir(self.spec.model.name)
        return self._model_dir

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from qdpo_core.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_dir)
        return self._tokenizer

    @property
    def teacher(self):
        if self._teacher is None:
            from qdpo_core.models import load_full_precision

            self._teacher = load_full_precision(self.model_dir, self.device, self.dtype)
        return self._teacher

    @property
    def student(self):
        if self._student is None:
            self._load_student()
        return self._student

    @property
    def quant_info(self):
        """What quantizing the student did: layers, bits, packed bytes."""
        if self._quant_info is None:
            self._load_student()
        return self._quant_info

    def _load_student(self) -> None:
        from qdpo_core.quantize import load_quantized

        self._student, self._quant_info = load_quantized(self.model_dir, self.spec.quantization, self.device, self.dtype)
        self._student.name_or_path = self.spec.model.name  # what peft names the adapters' base: the model's name, not this machine's directory
