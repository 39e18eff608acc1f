"""Quantization: RTN levels and error bounds; bitsandbytes layers; LoRA gradients through 4-bit layers."""

import pytest
import torch

from qdpo_core.config import QuantSpec
from qdpo_core.quantize import load_quantized, rtn_quantize_tensor


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_uses_at_most_2_to_the_bits_levels_per_group(bits):
    torch.manual_seed(0)
    weight = torch.randn(6, 128)
    q = rtn_quantize_tensor(weight, bits, 64)
    for row in range(6):
        for group in range(2):
            values = q[row, group * 64 : (group + 1) * 64]
            assert values.unique().numel() <= 2**bits
            span = weight[row, group * 64 : (group + 1) * 64]
            step = (span.max() - span.min()) / (2**bits - 1)
            # round-to-nearest: no weight moves by more than half a step (plus the zero-point rounding)
            assert (values - span).abs().max() <= step + 1e-5


def test_rtn_error_shrinks_with_bits_and_group_size_one_row():
    torch.manual_seed(0)
    weight = torch.randn(8, 96)  # 96 is not a multiple of 64: the padded tail must not leak in
    errors = [(rtn_quantize_tensor(weight, b, 64) - weight).abs().mean().item() for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01
    per_row = rtn_quantize_tensor(weight, 3, -1)
    assert per_row.shape == weight.shape
    assert all(per_row[r].unique().numel() <= 8 for r in range(8))


def test_rtn_model_keeps_the_output_head(tiny_model_dir):
    model, info = load_quantized(tiny_model_dir, QuantSpec(method="rtn", bits=2, group_size=64), "cpu")
    assert info.quantized_layers == 14  # 2 layers × (4 attention + 3 MLP)
    assert model.model.layers[0].mlp.down_proj.weight[0, :64].unique().numel() <= 4
    assert info.packed_bytes < info.memory_bytes


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
def test_bitsandbytes_methods_load_and_shrink(tiny_model_dir, method):
    import bitsandbytes as bnb

    model, info = load_quantized(tiny_model_dir, QuantSpec(method=method), "cpu")
    layer_type = bnb.nn.Linear8bitLt if method == "int8" else bnb.nn.Linear4bit
    assert isinstance(model.model.layers[0].self_attn.q_proj, layer_type)
    assert not isinstance(model.lm_head, layer_type)
    assert info.quantized_layers == 14


def _dequantized_copy(quantized, model_dir):
    """The same model with every 4-bit weight replaced by its de-quantized float values."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(model_dir)
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            dense.get_submodule(name).weight.data.copy_(F.dequantize_4bit(module.weight.data, module.weight.quant_state).float())
    return dense


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)  # init_lora_weights=False: B is random too, so every LoRA weight gets a gradient
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def _grads(model, input_ids):
    model.zero_grad()
    model.train()
    logits = model(input_ids=input_ids).logits
    (logits.float() ** 2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("shape", [(1, 1), (2, 7)])
def test_lora_gradients_through_4bit_layers_match_dequantized_float(tiny_model_dir, shape, monkeypatch):
    """The de-quantized float model is the ground truth for what LoRA on a 4-bit base should learn."""
    import bitsandbytes.nn.modules

    # Pretend this CPU has AVX512-BF16: there bitsandbytes repacks 4-bit weights at the first
    # eval-mode forward and serves them with `gemv_4bit`, which has no autograd kernel, so LoRA
    # gradients after any evaluation or generation would be wrong. load_quantized must prevent it.
    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    quantized, _ = load_quantized(tiny_model_dir, QuantSpec(method="nf4"), "cpu")
    dense = _dequantized_copy(quantized, tiny_model_dir)
    policy, reference = _lora(quantized), _lora(dense)
    input_ids = torch.randint(0, 1000, shape)
    policy.eval()
    with torch.no_grad():
        policy(input_ids=input_ids)  # an evaluation before training, as the pipeline does
    logits_q, grads_q = _grads(policy, input_ids)
    logits_d, grads_d = _grads(reference, input_ids)
    assert torch.allclose(logits_q, logits_d, atol=1e-4, rtol=1e-4)
    assert grads_q.keys() == grads_d.keys() and len(grads_q) == 2 * 14
    for name in grads_d:
        assert torch.allclose(grads_q[name], grads_d[name], atol=1e-5, rtol=1e-3), name


def test_the_notice_about_an_unused_bitsandbytes_kernel_is_dropped_and_other_warnings_are_not(caplog):
    import logging

    from qdpo_core.quantize import BNB_CPU_LOGGER

    logger = logging.getLogger(BNB_CPU_LOGGER)
    with caplog.at_level(logging.WARNING, logger=BNB_CPU_LOGGER):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...", "no Hub")
        logger.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]
