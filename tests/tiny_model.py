"""A tiny random Llama with the bundled SmolLM2 tokenizer (and its chat template), built in-process.

Small enough that a full pipeline run takes seconds on a CPU; real enough that every code path
(chat template, bitsandbytes 4-bit layers, LoRA, generation) is the one production uses.

    python tests/tiny_model.py DIR     # writes the model to DIR (used by the service tests' worker)
"""

from __future__ import annotations

import sys
from pathlib import Path

TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    initializer_range=0.2,  # large random weights, so quantization visibly changes the answers
)


def build_tiny_model(target: str | Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qdpo_core.models import load_tokenizer, resolve_model_dir

    target = Path(target)
    if (target / "model.safetensors").is_file():
        return target
    tokenizer = load_tokenizer(resolve_model_dir("smollm2-135m-instruct"))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_CONFIG,
    )
    model = LlamaForCausalLM(config)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(target)
    return target


if __name__ == "__main__":
    print(build_tiny_model(sys.argv[1]))
