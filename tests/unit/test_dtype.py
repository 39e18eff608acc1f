"""model.dtype auto: measured, not assumed, and used for every model the run loads."""

from __future__ import annotations

import torch

from qdpo_core.config import PipelineSpec
from qdpo_core.holder import ModelHolder
from qdpo_core.models import _matmul_seconds, resolve_dtype


def test_explicit_dtypes_are_kept_and_auto_follows_the_probe():
    assert resolve_dtype("float16", "cpu") == "float16" and resolve_dtype("float32", "cpu") == "float32"
    fp32, bf16 = _matmul_seconds(torch.float32), _matmul_seconds(torch.bfloat16)
    chosen = resolve_dtype("auto", "cpu")
    assert chosen in ("float32", "bfloat16")
    if fp32 > 3 * bf16:  # clearly faster in bfloat16 (AVX512-BF16 / AMX CPUs): auto must take it
        assert chosen == "bfloat16"
    if bf16 > 3 * fp32:  # clearly slower (AVX2-only CPUs, where bfloat16 is emulated): auto must not
        assert chosen == "float32"


def test_the_holder_loads_teacher_and_student_in_the_resolved_dtype(tiny_model_dir):
    holder = ModelHolder(PipelineSpec.from_dict({"model": {"name": str(tiny_model_dir), "dtype": "auto"}, "quantization": {"method": "rtn", "bits": 4}}))
    wanted = getattr(torch, holder.dtype)
    assert holder.dtype in ("float32", "bfloat16")
    assert next(holder.teacher.parameters()).dtype == wanted
    assert holder.student.model.layers[0].self_attn.q_proj.weight.dtype == wanted
