"""GGUF files, llama.cpp's format: read, checked and written with the `gguf` package (numpy only, no torch).

What qdpo does with them:

- quantize a full-precision (FP) weight to a GGUF type exactly as llama.cpp stores it
  (`gguf.quants.quantize`), and give back the values llama.cpp de-quantizes it to
  (`gguf.quants.dequantize`): the quantized student computes with those;
- read a registered GGUF file's weights, de-quantized, under the FP model's tensor names;
- check that a GGUF file and an FP model are the same network (architecture, tensor names, shapes);
- write `model-<TYPE>.gguf` (the quantized base: metadata and tokenizer taken from a GGUF of the
  same model, tensors re-quantized from FP) and `adapter.gguf` (a LoRA adapter in the layout of
  llama.cpp's convert_lora_to_gguf.py: general.type adapter, adapter.type lora, adapter.lora.alpha,
  `<base tensor>.lora_a` (r × in) and `.lora_b` (out × r), F32).

Tensor types of a written model: every 2-D weight of the blocks gets the requested type; the token
embeddings and the output head get Q8_0 (llama-quantize gives the output tensor more bits than the
rest; its usual Q6_K is not a type the `gguf` package writes, and Q8_0 is what it falls back to,
and what the bundled SmolLM2 GGUF holds); norms and other 1-D tensors stay F32. A weight whose
rows are not a whole number of blocks is stored F16. The quantized student uses, for every tensor,
dequantize(quantize(W)) of exactly the type written, so torch computes with the values llama.cpp
de-quantizes (llama.cpp's CPU kernels also quantize the activations to 8 bits inside its matrix
products, which no weight can reproduce; the tests measure that difference).

llama.cpp stores attn_q / attn_k of the llama architecture with the rows of each rotary pair
interleaved (convert_hf_to_gguf.py's `permute`); `permute_rows` applies that order to weights and
to LoRA B factors, `unpermute_rows` undoes it when a GGUF's weights are read back.

Messages name files by their name only, never by a server path: a job's error reaches its client.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GGUF_MAGIC = b"GGUF"
# Hugging Face architecture (config.json `architectures[0]`) -> GGUF general.architecture, and
# whether llama.cpp keeps attn_q / attn_k rows in its interleaved rotary order.
ARCHITECTURES = {"LlamaForCausalLM": ("llama", True)}
EMBEDDING_TYPE = "Q8_0"
ADAPTER_FILE = "adapter.gguf"
# The types write_model writes: the quantized ones a job can ask for, and F32 / F16 (an unquantized GGUF,
# the input llama.cpp's llama-quantize makes any other type from).
FILE_TYPES = {
    "Q4_0": "MOSTLY_Q4_0",
    "Q4_1": "MOSTLY_Q4_1",
    "Q5_0": "MOSTLY_Q5_0",
    "Q5_1": "MOSTLY_Q5_1",
    "Q8_0": "MOSTLY_Q8_0",
    "F16": "MOSTLY_F16",
    "F32": "ALL_F32",
}
# GGUF tensors a llama.cpp model may hold that have no Hugging Face weight (computed from the config).
DERIVED_TENSORS = ("rope_freqs.weight",)
SKIPPED_HF = (".rotary_emb.inv_freq",)


class GGUFProblem(ValueError):
    """A GGUF file is unusable, or is not the network of the FP model it is paired with."""


def model_file_name(type_name: str) -> str:
    return f"model-{type_name}.gguf"


def available() -> bool:
    """Whether this process can read GGUF files (the API image has no numpy-based packages)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("gguf", "numpy", "safetensors"))


# ---- the FP model's side ----------------------------------------------------------------------


def fp_config(fp_dir: Path) -> dict:
    return json.loads((Path(fp_dir) / "config.json").read_text())


def architecture(config: dict) -> tuple[str, bool]:
    """(GGUF architecture name, q/k rows permuted) of a Hugging Face config; GGUFProblem if unsupported."""
    names = config.get("architectures") or [config.get("model_type", "?")]
    if names[0] not in ARCHITECTURES:
        supported = ", ".join(ARCHITECTURES)
        raise GGUFProblem(f"GGUF support covers {supported} (llama.cpp's 'llama' architecture); this model is {names[0]}")
    return ARCHITECTURES[names[0]]


def name_map(config: dict):
    """gguf's map of Hugging Face tensor names to llama.cpp's for this model."""
    import gguf

    arch_name, _ = architecture(config)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    return gguf.get_tensor_name_map(arch, int(config["num_hidden_layers"]))


def gguf_name(hf_name: str, tensor_map) -> str | None:
    """llama.cpp's name of a Hugging Face tensor (`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`)."""
    return tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def heads_for(gguf_tensor: str, config: dict) -> tuple[int, int] | None:
    """(n_head, n_head_kv) for the permutation of an attn_q / attn_k tensor of a permuted architecture, else None."""
    _, permuted = architecture(config)
    if not permuted:
        return None
    n_head = int(config["num_attention_heads"])
    if ".attn_q." in gguf_tensor:
        return n_head, n_head
    if ".attn_k." in gguf_tensor:
        return n_head, int(config.get("num_key_value_heads") or n_head)
    return None


def permute_rows(weights, n_head: int, n_head_kv: int):
    """llama.cpp's row order of attn_q / attn_k (convert_hf_to_gguf.py's LlamaModel.permute), on axis 0."""
    heads = n_head_kv  # llama.cpp permutes attn_k by its own (key/value) head count
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def unpermute_rows(weights, n_head: int, n_head_kv: int):
    """The inverse of permute_rows: Hugging Face's row order."""
    heads = n_head_kv
    return weights.reshape(heads, weights.shape[0] // heads // 2, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def fp_tensor_shapes(fp_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor of the FP checkpoint (safetensors headers only, no data read) -> its shape."""
    from safetensors import safe_open

    files = sorted(Path(fp_dir).glob("*.safetensors"))
    if not files:
        raise GGUFProblem(f"{Path(fp_dir).name} has no safetensors weights")
    shapes = {}
    for path in files:
        with safe_open(str(path), framework="numpy") as handle:
            for key in handle.keys():
                if not key.endswith(SKIPPED_HF):
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def expected_gguf_tensors(fp_dir: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF tensor name -> (Hugging Face name, numpy-order shape) the FP model implies."""
    config = fp_config(fp_dir)
    tensor_map = name_map(config)
    expected = {}
    for hf_name, shape in fp_tensor_shapes(fp_dir).items():
        name = gguf_name(hf_name, tensor_map)
        if name is None:
            raise GGUFProblem(f"the FP model's tensor {hf_name} has no llama.cpp name; it is not a plain {architecture(config)[0]} model")
        if name == "output.weight" and config.get("tie_word_embeddings"):
            continue  # tied to the embeddings: llama.cpp uses token_embd as the output
        expected[name] = (hf_name, shape)
    return expected


# ---- a GGUF file ------------------------------------------------------------------------------


@dataclass
class Inspection:
    """What a GGUF file holds (its header: no tensor data is read)."""

    name: str  # the file's name, never its directory
    bytes: int
    architecture: str
    file_type: str | None  # e.g. Q4_K_M, from general.file_type
    tensors: dict[str, tuple[tuple[int, ...], str]]  # name -> (numpy-order shape, GGML type name)
    has_vocab: bool
    general_type: str | None
    type_counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"name": self.name, "bytes": self.bytes, "file_type": self.file_type, "tensor_types": dict(sorted(self.type_counts.items()))}


def open_reader(path: Path):
    """A gguf.GGUFReader on `path`, or GGUFProblem saying plainly what is wrong with the file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise GGUFProblem(f"{path.name} does not exist")
    with path.open("rb") as handle:
        head = handle.read(4)
    if head != GGUF_MAGIC:
        raise GGUFProblem(f"{path.name} is not a GGUF file (it starts with {head!r}, a GGUF file with b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises whatever numpy or struct says about a short or garbled header
        raise GGUFProblem(f"{path.name} is truncated or corrupt: its header cannot be read ({type(exc).__name__}: {exc})") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise GGUFProblem(f"{path.name} is truncated: tensor {tensor.name} ends at byte {tensor.data_offset + tensor.n_bytes:,} of a {size:,}-byte file")
    return reader


def field_value(reader, key: str):
    field_ = reader.fields.get(key)
    return None if field_ is None else field_.contents()


@functools.lru_cache(maxsize=32)
def _inspect(path: str, _size: int, _mtime: int) -> Inspection:
    import gguf

    reader = open_reader(Path(path))
    file_type = field_value(reader, "general.file_type")
    try:
        file_type_name = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_") if file_type is not None else None
    except ValueError:
        file_type_name = str(file_type)
    tensors = {t.name: (tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type.name) for t in reader.tensors}
    return Inspection(
        name=Path(path).name,
        bytes=Path(path).stat().st_size,
        architecture=str(field_value(reader, "general.architecture") or "?"),
        file_type=file_type_name,
        tensors=tensors,
        has_vocab="tokenizer.ggml.model" in reader.fields,
        general_type=field_value(reader, "general.type"),
        type_counts=dict(Counter(t for _, t in tensors.values())),
    )


def inspect(path: Path) -> Inspection:
    """The file's header, parsed once per process and file version."""
    stat = Path(path).stat() if Path(path).is_file() else None
    return _inspect(str(path), stat.st_size if stat else -1, stat.st_mtime_ns if stat else -1)


def dequantizable(type_name: str) -> bool:
    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def check_pair(path: Path, fp_dir: Path) -> Inspection:
    """The GGUF file is a llama.cpp model of the FP model's network; GGUFProblem naming the first difference."""
    info = inspect(path)
    config = fp_config(fp_dir)
    arch_name, _ = architecture(config)
    if info.general_type not in (None, "model"):
        raise GGUFProblem(f"{info.name} is a GGUF {info.general_type}, not a model; register the quantized model file")
    if info.architecture != arch_name:
        raise GGUFProblem(f"{info.name} is a GGUF of architecture {info.architecture!r}, but its FP model is {arch_name!r}: they are not the same network")
    if not info.has_vocab:
        raise GGUFProblem(f"{info.name} has no tokenizer (tokenizer.ggml.*), so llama.cpp cannot run it; register the complete model file")
    expected = expected_gguf_tensors(fp_dir)
    for name, (hf_name, shape) in expected.items():
        if name in info.tensors and info.tensors[name][0] != shape:
            got = info.tensors[name][0]
            raise GGUFProblem(f"{info.name}: tensor {name} is {list(got)} but the FP model's {hf_name} is {list(shape)}: not the same network")
    missing = sorted(set(expected) - set(info.tensors))
    if missing:
        raise GGUFProblem(f"{info.name} lacks tensors the FP model has ({', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}): not the same network")
    extra = sorted(set(info.tensors) - set(expected) - set(DERIVED_TENSORS))
    if "output.weight" in extra and config.get("tie_word_embeddings"):
        raise GGUFProblem(f"{info.name} has its own output.weight, but the FP model ties its output head to the embeddings")
    if extra:
        raise GGUFProblem(f"{info.name} has tensors the FP model does not ({', '.join(extra[:4])}{' …' if len(extra) > 4 else ''}): not the same network")
    for name in expected:
        type_name = info.tensors[name][1]
        if not dequantizable(type_name):
            raise GGUFProblem(f"{info.name}: tensor {name} is {type_name}, which the gguf package cannot de-quantize")
    return info


# ---- quantizing -------------------------------------------------------------------------------


def tensor_type(name: str, shape: tuple[int, ...], requested: str) -> str:
    """The GGML type a written model stores tensor `name` in (see the module docstring)."""
    import gguf

    if len(shape) < 2 or name.endswith("_norm.weight"):
        return "F32"
    unquantized = requested in ("F32", "F16")
    wanted = EMBEDDING_TYPE if name in ("token_embd.weight", "output.weight") and not unquantized else requested
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[wanted]]
    return wanted if shape[-1] % block == 0 else "F16"


def quantize(array, type_name: str):
    """(stored data as gguf writes it, the float32 values llama.cpp de-quantizes it to)."""
    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType[type_name]
    stored = gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)
    return stored, gguf.quants.dequantize(stored, qtype).astype(np.float32, copy=False).reshape(array.shape)


def read_weights(path: Path, fp_dir: Path) -> dict[str, object]:
    """The GGUF file's tensors de-quantized to float32, by the FP model's (Hugging Face) names and row order."""
    import gguf
    import numpy as np

    config = fp_config(fp_dir)
    reader = open_reader(path)
    by_gguf = {t.name: t for t in reader.tensors}
    weights = {}
    for name, (hf_name, shape) in expected_gguf_tensors(fp_dir).items():
        tensor = by_gguf[name]
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False).reshape(shape)
        heads = heads_for(name, config)
        weights[hf_name] = unpermute_rows(values, *heads) if heads else values
    return weights


# ---- writing ----------------------------------------------------------------------------------


def _copy_metadata(reader, writer, skip: Iterable[str]) -> None:
    """Every key of `reader` but the virtual GGUF.* ones, general.architecture (the writer sets it) and `skip`."""
    import gguf

    skip = set(skip) | {gguf.Keys.General.ARCHITECTURE}
    for field_ in reader.fields.values():
        if field_.name.startswith("GGUF.") or field_.name in skip:
            continue
        value_type = field_.types[0]
        sub_type = field_.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field_.name, field_.contents(), value_type, sub_type=sub_type)


def write_model(
    target: Path, template: Path, fp_dir: Path, type_name: str, fp_array: Callable[[str], object], on_tensor: Callable[[int, int], None] | None = None
) -> dict:
    """Write the FP model quantized to `type_name` as a llama.cpp model GGUF; return {tensor types: count}.

    Metadata (hyperparameters, tokenizer, chat template) comes from `template`, a GGUF of the same
    network (checked); `fp_array(hf_name)` gives an FP weight as a float32 numpy array. Tensors are
    quantized and written one at a time, in the template's order.
    """
    import gguf
    import numpy as np

    config = fp_config(fp_dir)
    check_pair(template, fp_dir)
    reader = open_reader(template)
    expected = expected_gguf_tensors(fp_dir)
    plan: list[tuple[str, str, Any, tuple[int, ...] | None]] = []  # (name, type, source): source is an HF name, or the template tensor for derived ones
    for tensor in reader.tensors:
        if tensor.name in expected:
            hf_name, fp_shape = expected[tensor.name]
            plan.append((tensor.name, tensor_type(tensor.name, fp_shape, type_name), hf_name, fp_shape))
        else:
            plan.append((tensor.name, tensor.tensor_type.name, tensor, None))
    writer = gguf.GGUFWriter(path=None, arch=reader.fields["general.architecture"].contents())
    _copy_metadata(reader, writer, skip=("general.file_type", "general.quantization_version"))
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[type_name]].value)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, type_, source, shape in plan:
        qtype = gguf.GGMLQuantizationType[type_]
        if shape is None:
            writer.add_tensor_info(name, source.data.shape, source.data.dtype, source.data.nbytes, source.tensor_type)
        elif type_ in ("F32", "F16"):
            dtype = np.dtype(np.float32 if type_ == "F32" else np.float16)
            writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), qtype)
    counts = Counter(type_ for _, type_, _, _ in plan)
    partial = Path(target).with_name(Path(target).name + ".part")
    writer.write_header_to_file(path=partial)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for number, (name, type_, source, shape) in enumerate(plan, start=1):
        if shape is None:
            writer.write_tensor_data(source.data, tensor_endianess=reader.endianess)
        else:
            values = np.asarray(fp_array(source), dtype=np.float32).reshape(shape)
            heads = heads_for(name, config)
            if heads:
                values = permute_rows(values, *heads)
            writer.write_tensor_data(quantize(values, type_)[0])
        if on_tensor:
            on_tensor(number, len(plan))
    writer.close()
    os.replace(partial, target)
    return dict(sorted(counts.items()))


def write_adapter(target: Path, fp_dir: Path, lora: dict[str, tuple[object, object, float]], alpha: float, name: str) -> dict:
    """Write a llama.cpp LoRA adapter GGUF; return {base tensor: rank}.

    `lora` maps a Hugging Face module name (`model.layers.0.self_attn.q_proj`) to (A (r × in),
    B (out × r), PEFT's scaling of that layer). llama.cpp adds (alpha / r)·B·A·x, PEFT scaling·B·A·x:
    where the two differ (rsLoRA), B is scaled so the adapter computes what PEFT computed.
    """
    import gguf
    import numpy as np

    config = fp_config(fp_dir)
    tensor_map = name_map(config)
    arch_name, _ = architecture(config)
    writer = gguf.GGUFWriter(path=None, arch=arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    ranks = {}
    for module, (a, b, scaling) in sorted(lora.items()):
        base = gguf_name(module + ".weight", tensor_map)
        if base is None or base in ("token_embd.weight", "output.weight"):
            raise GGUFProblem(f"the adapter's layer {module} has no llama.cpp LoRA equivalent; train only the blocks' linear layers (target_modules)")
        a = np.ascontiguousarray(a, dtype=np.float32)
        b = np.asarray(b, dtype=np.float32) * np.float32(scaling / (alpha / a.shape[0]))
        heads = heads_for(base, config)
        if heads:
            b = permute_rows(b, *heads)
        writer.add_tensor(base + ".lora_a", a)
        writer.add_tensor(base + ".lora_b", np.ascontiguousarray(b))
        ranks[base] = int(a.shape[0])
    partial = Path(target).with_name(Path(target).name + ".part")
    writer.write_header_to_file(path=partial)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, target)
    return ranks
