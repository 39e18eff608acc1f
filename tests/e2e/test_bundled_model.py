"""End to end on the real bundled SmolLM2-135M-Instruct: a few prompts, a few tokens, nf4.

Asserts the things a user relies on: quantization really flips tokens on this model, training
runs, and the exported adapter loads onto the same quantized base and changes its outputs.
"""

import pytest
import torch

from qdpo_core.config import PipelineSpec
from qdpo_core.export import load_aligned, verify
from qdpo_core.pipeline import run_pipeline

pytestmark = pytest.mark.e2e


def test_qdpo_on_bundled_smollm2_exports_an_adapter_that_changes_the_quantized_model(tmp_path):
    spec = PipelineSpec.from_dict(
        {
            "method": "qdpo",
            "model": {"name": "smollm2-135m-instruct"},
            "quantization": {"method": "nf4"},
            "dataset": {"max_train_prompts": 6, "max_eval_prompts": 3},
            "generation": {"max_new_tokens": 16, "batch_size": 6},
            "eval": {"max_new_tokens": 16},
            # select_best off: this test is about export and loading, so the adapter must be the trained one
            "train": {"epochs": 1, "batch_size": 3, "learning_rate": 5e-4, "select_best": False},
        }
    )
    events = []
    result = run_pipeline(spec, tmp_path, on_event=events.append)
    report = result.report
    assert report["ptq"]["token_flip_rate"] > 0  # nf4 does flip tokens of this model
    assert report["ptq"]["kl"] > 0.01
    assert report["pairs"]["examples"] >= 1
    assert [e.step for e in events if e.type == "metrics"] == [1, 2] or report["pairs"]["examples"] <= 3

    manifest = verify(result.export_dir)
    assert manifest["base_model"]["name"] == "smollm2-135m-instruct"
    model, tokenizer = load_aligned(result.export_dir, device="cpu")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a fruit that is yellow."}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        aligned = model(**prompt).logits
        with model.disable_adapter():
            quantized = model(**prompt).logits
    assert (aligned - quantized).abs().max().item() > 1e-3


def test_calibrated_init_alone_brings_the_bundled_model_closer_to_full_precision(tmp_path):
    """Training-free repair on the real model: the calibrated init's held-out KL is below PTQ-only's."""
    spec = PipelineSpec.from_dict(
        {
            "method": "kd",
            "model": {"name": "smollm2-135m-instruct"},
            "quantization": {"method": "rtn", "bits": 3, "group_size": 64},
            "dataset": {"max_train_prompts": 12, "max_eval_prompts": 4},
            "generation": {"max_new_tokens": 24, "batch_size": 6},
            "eval": {"max_new_tokens": 24},
            "train": {"epochs": 0, "init": "calibrated", "lora_rank": 16},
        }
    )
    result = run_pipeline(spec, tmp_path)
    report = result.report
    assert report["init"]["kept"] and report["init"]["full_gram_layers"] == 210  # 30 blocks × 7 linear layers
    assert report["aligned"]["kl"] < 0.8 * report["ptq"]["kl"]  # measured: about half
    assert report["aligned"]["token_flip_rate"] < report["ptq"]["token_flip_rate"]
    model, _ = load_aligned(result.export_dir, device="cpu")  # an ordinary PEFT adapter on the same quantized base
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


def test_greedy_loop_gives_transformers_answers_on_the_bundled_model():
    from qdpo_core.generate import Decoding, greedy_generate, hf_generate, shared_prefix_length
    from qdpo_core.models import load_full_precision, load_tokenizer, resolve_model_dir
    from qdpo_core.prompts import builtin_prompts
    from qdpo_core.tokens import encode_prompt

    model_dir = resolve_model_dir("smollm2-135m-instruct")
    tokenizer, model = load_tokenizer(model_dir), load_full_precision(model_dir, "cpu")
    prompts = [encode_prompt(tokenizer, r["messages"], 512).ids for r in builtin_prompts("eval")[:8]]
    assert shared_prefix_length(prompts) > 0  # the chat template's common start takes the shared-prefix path
    ours = greedy_generate(model, tokenizer, prompts, 40)
    reference = hf_generate(model, tokenizer, prompts, Decoding(max_new_tokens=40))
    assert [r.ids for r in ours] == [r.ids for r in reference]
    assert any(r.finished for r in ours)  # real answers end with the end-of-turn token within 40 tokens
