"""Build the quantized student: bitsandbytes nf4 / fp4 / int8, or group-wise RTN fake-quant.

bitsandbytes is imported here and nowhere else. The full-precision teacher is loaded separately
(`models.load_full_precision`) and never modified.

RTN ("round to nearest") is the plain post-training baseline: each row of a linear weight is cut
into groups of `group_size` input weights; each group gets its own scale and zero point and is
rounded to 2^bits levels. We keep the de-quantized values in float ("fake quant"): the numbers are
exactly those a packed kernel would compute with, which is what alignment has to repair.

GGUF (`method: gguf`) is llama.cpp's quantization, done the same way: every weight is quantized to
its GGUF type with the `gguf` package and replaced by the values llama.cpp de-quantizes it to
(qdpo_core.gguf_files says which tensor gets which type: the embeddings / output head Q8_0, norms
F32). With `type` left empty the weights are those of the GGUF file registered with the model,
de-quantized: any type llama.cpp makes, K-quants included. LoRA on this frozen base computes
W_q·x + s·B·A·x, exactly how llama.cpp applies a LoRA adapter at run time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from qdpo_core.config import QuantSpec
from qdpo_core.models import quiet_transformers, torch_dtype

log = logging.getLogger(__name__)

# Output heads and embeddings stay in full precision, as bitsandbytes does by default.
SKIP_MODULES = ("lm_head",)


class _UnusedKernelNotice(logging.Filter):
    """Drop bitsandbytes' import-time warning, on CPUs with AVX512-BF16, that it could not fetch a
    fused 4-bit kernel from the Hub: that kernel serves the repacked inference path we turn off
    (disable_cpu_weight_packing), so the warning (and its advice to install a package) is noise in
    every job's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


# Installed at import: bitsandbytes logs it once, when its CPU backend is first imported.
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
if not any(isinstance(f, _UnusedKernelNotice) for f in logging.getLogger(BNB_CPU_LOGGER).filters):
    logging.getLogger(BNB_CPU_LOGGER).addFilter(_UnusedKernelNotice())


@dataclass
class QuantInfo:
    method: str
    bits: float  # GGUF: bits per weight of the stored model
    group_size: int | None
    memory_bytes: int  # as held in memory here
    packed_bytes: int  # what the weights take when stored at `bits` (RTN: weights + per-group scale/zero; GGUF: the file's tensors)
    quantized_layers: int
    gguf_types: dict | None = None  # GGUF: {GGML type: tensor count}

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def load_quantized(model_dir: Path, spec: QuantSpec, device: str, dtype: str = "float32"):
    """Load a fresh quantized copy of the model in `model_dir` → (model, QuantInfo)."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    if spec.method == "gguf":
        model, info = gguf_quantize(model_dir, spec, dtype)
        model.to(device)
        model.eval()
        model.requires_grad_(False)
        info.memory_bytes = model.get_memory_footprint()
        return model, info
    assert spec.bits is not None  # QuantSpec sets the bits of every method but gguf
    if spec.method == "rtn":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype), use_safetensors=True)
        layers, packed = rtn_quantize_(model, spec.bits, spec.group_size)
        model.to(device)  # type: ignore[arg-type]  # transformers' @wraps(nn.Module.to) hides the bound method
    else:
        _quiet_bitsandbytes()
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=torch_dtype(dtype),
            quantization_config=bnb_config(spec, dtype),
            device_map={"": device},
            use_safetensors=True,
        )
        layers = disable_cpu_weight_packing(model)
        packed = model.get_memory_footprint()
    model.eval()
    model.requires_grad_(False)
    info = QuantInfo(spec.method, spec.bits, spec.group_size if spec.method == "rtn" else None, model.get_memory_footprint(), packed, layers)
    return model, info


def bnb_config(spec: QuantSpec, dtype: str = "float32"):
    from transformers import BitsAndBytesConfig

    if spec.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(SKIP_MODULES))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.method,  # "nf4" | "fp4"
        bnb_4bit_compute_dtype=torch_dtype(dtype),
        bnb_4bit_use_double_quant=spec.double_quant,
        llm_int8_skip_modules=list(SKIP_MODULES),
    )


def disable_cpu_weight_packing(model: nn.Module) -> int:
    """Keep bitsandbytes 4-bit layers on their autograd-capable path; return the layer count.

    On CPUs with AVX512-BF16, an eval-mode forward repacks 4-bit weights into a bf16 layout served
    by `gemv_4bit`, which has no autograd kernel: after any evaluation or generation, LoRA gradients
    through those layers would be silently wrong, and the quantized model's numbers would differ
    from the ones training sees. We turn the repacking off before the first forward pass (and undo
    a repacking that already happened, which restores the autograd path; its bf16 scales stay).
    """
    import bitsandbytes as bnb

    try:
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse
    except ImportError:  # releases without CPU repacking: nothing to undo
        _convert_weight_packed_for_cpu_inverse = None  # type: ignore[assignment]

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            weight = cast(Any, module.weight)  # a bitsandbytes Params4bit (nn.Linear types it as a plain Tensor)
            state = weight.quant_state
            if _convert_weight_packed_for_cpu_inverse is not None and getattr(state, "packing_format_for_cpu", False):
                weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            count += 1
        elif isinstance(module, bnb.nn.Linear8bitLt):
            count += 1
    return count


def _quiet_bitsandbytes() -> None:
    # LLM.int8 warns on every matmul that float32 inputs are cast to float16; once is enough.
    class _Once(logging.Filter):
        seen: set = set()

        def filter(self, record: logging.LogRecord) -> bool:
            key = record.getMessage()[:60]
            if key in self.seen:
                return False
            self.seen.add(key)
            return True

    for name in ("bitsandbytes", "bitsandbytes.autograd._functions"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Once) for f in logger.filters):
            logger.addFilter(_Once())
    import warnings

    warnings.filterwarnings("once", message="MatMul8bitLt")


def rtn_quantize_tensor(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Asymmetric round-to-nearest per group of input weights; returns de-quantized float values.

    weight: (out_features, in_features). group_size -1 means one group per output row.
    """
    out_features, in_features = weight.shape
    size = in_features if group_size == -1 else group_size
    pad = (-in_features) % size
    w = weight.float()
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))  # padding is sliced off below
    groups = w.reshape(out_features, -1, size)  # (O, G, S)
    low = groups.amin(dim=-1, keepdim=True)
    high = groups.amax(dim=-1, keepdim=True)
    levels = 2**bits - 1
    scale = ((high - low) / levels).clamp(min=1e-8)  # (O, G, 1)
    zero = torch.round(-low / scale)
    q = torch.clamp(torch.round(groups / scale) + zero, 0, levels)
    dequant = ((q - zero) * scale).reshape(out_features, -1)[:, :in_features]
    return dequant.to(weight.dtype)


@torch.no_grad()
def rtn_quantize_(model: nn.Module, bits: int, group_size: int) -> tuple[int, int]:
    """Fake-quantize every nn.Linear except SKIP_MODULES in place → (layers, packed_bytes)."""
    layers = 0
    packed_bits = 0
    quantized_params = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith(SKIP_MODULES):
            weight = module.weight
            module.weight.copy_(rtn_quantize_tensor(weight, bits, group_size))
            groups = weight.shape[0] * (1 if group_size == -1 else -(-weight.shape[1] // group_size))
            packed_bits += weight.numel() * bits + groups * 2 * 16  # fp16 scale + zero per group
            quantized_params += weight.numel()
            layers += 1
    other = sum(p.numel() for p in model.parameters()) - quantized_params  # parameters() de-duplicates tied weights
    return layers, packed_bits // 8 + other * 2  # the rest stored as 16-bit


@torch.no_grad()
def gguf_quantize(model_dir: Path, spec: QuantSpec, dtype: str = "float32"):
    """The FP model with every weight replaced by its GGUF de-quantized values → (model, QuantInfo).

    spec.type set: the FP weights quantized to that type (needs a GGUF of the model for the export's
    metadata: checked here, before any work). spec.type empty: the registered GGUF file's weights.
    """
    import numpy as np
    from transformers import AutoModelForCausalLM

    from qdpo_core import gguf_files
    from qdpo_core.config import GGUF_TYPES
    from qdpo_core.errors import SpecError
    from qdpo_core.models import gguf_file_for

    if dtype != "float32":  # 'auto' may have chosen bfloat16 for the teacher; the GGUF student stays exact
        log.warning("method gguf: the quantized model computes in float32, as llama.cpp does (model.dtype %s applies to the FP teacher only)", dtype)
    found = gguf_file_for(model_dir)
    if found is None:
        raise SpecError(
            "quantization.method: 'gguf' takes the model's llama.cpp metadata (hyperparameters, tokenizer) from a GGUF of the same model, and this "
            'model has none; register one in the model\'s directory (QDPO_EXTRA_MODELS {"<name>": "<model dir>/<file>.gguf"})',
            param="quantization.method",
        )
    gguf_path, fp_source = found
    try:
        config = gguf_files.fp_config(model_dir)
        gguf_files.architecture(config)
        if spec.type is None:
            if fp_source:
                raise SpecError(
                    f"quantization.type: this model's FP weights are its GGUF file's own de-quantized weights; choose a type: {', '.join(GGUF_TYPES)}",
                    param="quantization.type",
                )
            inspection = gguf_files.check_pair(gguf_path, model_dir)
            weights = gguf_files.read_weights(gguf_path, model_dir)
        else:
            inspection, weights = None, None
    except gguf_files.GGUFProblem as exc:
        raise SpecError(f"quantization.method: {exc}", param="quantization.method") from None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    tensor_map = gguf_files.name_map(config)
    types: dict[str, int] = {}
    packed = layers = 0
    linear = {name + ".weight" for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    for name, param in model.named_parameters():  # tied weights appear once
        gguf_name = gguf_files.gguf_name(name, tensor_map)
        if gguf_name is None:
            raise SpecError(f"quantization.method: the model's tensor {name} has no llama.cpp name", param="quantization.method")
        if weights is not None:
            assert inspection is not None  # read with the weights
            values = weights[name]
            type_ = inspection.tensors[gguf_name][1]
        else:
            assert spec.type is not None  # no registered weights: the FP ones are quantized to spec.type
            type_ = gguf_files.tensor_type(gguf_name, tuple(param.shape), spec.type)
            stored, values = gguf_files.quantize(param.detach().cpu().numpy(), type_)
            packed += stored.nbytes
        param.copy_(torch.from_numpy(np.array(values, dtype=np.float32)).reshape(param.shape))
        types[type_] = types.get(type_, 0) + 1
        layers += name in linear and type_ not in ("F32", "F16")
    if inspection is not None:
        packed = inspection.bytes
    params = sum(p.numel() for p in model.parameters())
    bits = GGUF_TYPES[spec.type] if spec.type else round(8 * packed / params, 2)
    return model, QuantInfo("gguf", bits, None, 0, packed, layers, gguf_types=dict(sorted(types.items())))
