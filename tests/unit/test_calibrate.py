"""The calibrated init: the least-squares maths, exact de-quantization, PEFT round trip, the fallback."""

from __future__ import annotations

import json

import pytest
import torch

from qdpo_core.calibrate import dequantized_weight, initialise_adapter, low_rank_factors, whitening
from qdpo_core.config import PipelineSpec, QuantSpec, TrainSpec
from qdpo_core.models import load_full_precision
from qdpo_core.pipeline import run_pipeline
from qdpo_core.quantize import load_quantized
from qdpo_core.tokens import collate, encode_prompt
from qdpo_core.train import make_policy


def _correlated_inputs(n: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=generator) * torch.logspace(0, -2, width)  # few strong, many weak directions
    return torch.randn(n, width, generator=generator) @ mixing.T + 0.01 * torch.randn(n, width, generator=generator)


def _output_error(x: torch.Tensor, residual: torch.Tensor, correction: torch.Tensor) -> float:
    return float((x @ (residual - correction).T).norm() / (x @ residual.T).norm())


def test_calibrated_beats_plain_svd_beats_nothing_and_is_exact_at_full_rank():
    x = _correlated_inputs(400, 32)
    residual = torch.randn(48, 32, generator=torch.Generator().manual_seed(1))
    gram = x.T @ x
    for rank in (4, 8):
        b, a = low_rank_factors(residual, rank)
        plain = _output_error(x, residual, b @ a)
        b, a = low_rank_factors(residual, rank, whiten=whitening(gram, len(x), damping=1e-6))
        calibrated = _output_error(x, residual, b @ a)
        b, a = low_rank_factors(residual, rank, channel_scale=(torch.diagonal(gram) / len(x)).sqrt())
        diagonal = _output_error(x, residual, b @ a)
        assert calibrated < diagonal < plain < 1.0, (rank, calibrated, diagonal, plain)
    b, a = low_rank_factors(residual, 32, whiten=whitening(gram, len(x), damping=1e-8))
    assert _output_error(x, residual, b @ a) < 1e-5  # full rank: the error is gone


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
def test_dequantized_weight_is_what_the_bitsandbytes_layer_computes(tiny_model_dir, method):
    model, _ = load_quantized(tiny_model_dir, QuantSpec(method=method), "cpu")
    layer = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer(torch.randn(2, layer.in_features))  # int8 moves its scales into the layer state on first use
        eye = torch.eye(layer.in_features)  # one-hot rows: the layer's output is the weight's columns
        computed = layer(eye).T.float()  # (out, in)
    weight = dequantized_weight(layer)
    # int8 computes in float16 (its activations are quantized too; one-hot rows quantize exactly)
    tolerance = 2e-3 * weight.abs().max() if method == "int8" else 1e-6
    assert weight.shape == computed.shape
    assert (weight - computed).abs().max() <= tolerance


def _calibration(tiny_model_dir, tokenizer, count: int = 6):
    teacher = load_full_precision(tiny_model_dir, "cpu")
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": f"Tell me about topic {i}."}], 64).ids for i in range(count)]
    answers = [list(range(100 + i, 110 + i)) + [tokenizer.eos_token_id] for i in range(count)]
    return teacher, [collate(prompts[:3], answers[:3], tokenizer.pad_token_id), collate(prompts[3:], answers[3:], tokenizer.pad_token_id)]


def test_initialised_adapter_round_trips_through_peft_and_repairs_the_layer_outputs(tiny_model_dir, tokenizer, tmp_path):
    from peft import PeftModel

    teacher, batches = _calibration(tiny_model_dir, tokenizer)
    spec = TrainSpec(lora_rank=8)
    student, _ = load_quantized(tiny_model_dir, QuantSpec(method="rtn", bits=2, group_size=32), "cpu")
    policy = make_policy(student, spec, seed=0, base_model_name="tiny")
    result = initialise_adapter(policy, teacher, "calibrated", batches)
    assert result.layers == 14 and result.full_gram_layers == 14 and result.diagonal_layers == 0
    assert result.calibration_sequences == 6 and result.calibration_tokens > 60
    assert 0 < result.relative_error < 1  # the adapter removed part of the output error on the calibration data
    ids = batches[0].input_ids
    with torch.no_grad():
        trained_logits = policy(input_ids=ids, attention_mask=batches[0].attention_mask).logits
    policy.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    fresh, _ = load_quantized(tiny_model_dir, QuantSpec(method="rtn", bits=2, group_size=32), "cpu")
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    with torch.no_grad():
        loaded_logits = loaded(input_ids=ids, attention_mask=batches[0].attention_mask).logits
        with loaded.disable_adapter():
            base_logits = loaded(input_ids=ids, attention_mask=batches[0].attention_mask).logits
        fp_logits = teacher(input_ids=ids, attention_mask=batches[0].attention_mask).logits
    assert torch.allclose(loaded_logits, trained_logits, atol=1e-5)
    # on the data it was calibrated on, the initialised model is closer to full precision than PTQ-only
    assert (loaded_logits - fp_logits).norm() < (base_logits - fp_logits).norm()


def test_every_target_layer_respects_the_lora_scaling(tiny_model_dir, tokenizer):
    """s·B·A is the computed correction whatever alpha is: the init divides by the scaling."""
    teacher, batches = _calibration(tiny_model_dir, tokenizer)
    corrections = []
    for alpha in (4, 64):
        student, _ = load_quantized(tiny_model_dir, QuantSpec(method="nf4"), "cpu")
        policy = make_policy(student, TrainSpec(lora_rank=4, lora_alpha=alpha), seed=0)
        initialise_adapter(policy, teacher, "svd")
        layer = policy.base_model.model.model.layers[1].self_attn.o_proj
        corrections.append(layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
    assert torch.allclose(corrections[0], corrections[1], atol=1e-6)
    assert corrections[0].abs().max() > 0


def _spec(model_dir, quantization=None, **train):
    return PipelineSpec.from_dict(
        {
            "method": "kd",
            "model": {"name": str(model_dir)},
            "quantization": quantization or {"method": "rtn", "bits": 2, "group_size": 32},
            "dataset": {"max_train_prompts": 6, "max_eval_prompts": 3},
            "generation": {"max_new_tokens": 6},
            "eval": {"max_new_tokens": 6},
            "train": {"epochs": 0, **train},
        }
    )


def test_a_calibrated_init_that_loses_to_ptq_falls_back_to_identity(tiny_model_dir, tmp_path, monkeypatch):
    # Constructed: the correction is computed as usual, then applied with the wrong sign, so the
    # initialised model doubles the quantization error instead of removing it.
    from qdpo_core import calibrate

    real = calibrate.factor_ladder
    monkeypatch.setattr(calibrate, "factor_ladder", lambda *args, **kwargs: (lambda b, a, energy: (-b, a, energy))(*real(*args, **kwargs)))
    events = []
    result = run_pipeline(_spec(tiny_model_dir), tmp_path, on_event=events.append)
    init = result.report["init"]
    assert init["init"] == "calibrated" and init["kept"] is False
    assert init["metrics"]["kl"] > result.report["ptq"]["kl"]
    assert any(e.level == "warning" and "training starts from the identity adapter" in e.message for e in events)
    assert "did not beat PTQ-only" in result.report["verdict"]
    from safetensors.torch import load_file

    weights = load_file(result.export_dir / "adapter" / "adapter_model.safetensors")
    assert all(float(t.abs().max()) == 0 for name, t in weights.items() if "lora_B" in name)  # the identity adapter
    assert result.report["aligned"]["kl"] == pytest.approx(result.report["ptq"]["kl"], rel=1e-3, abs=1e-9)


def test_a_calibrated_init_that_helps_is_step_zero_and_is_exported_with_its_record(tiny_model_dir, tmp_path):
    result = run_pipeline(_spec(tiny_model_dir), tmp_path)
    report, manifest = result.report, result.manifest
    assert report["init"]["kept"] is True and report["selected_checkpoint"] == 0
    assert report["aligned"]["kl"] < report["ptq"]["kl"]
    assert report["init"]["metrics"]["kl"] == pytest.approx(report["aligned"]["kl"], rel=1e-4)
    assert manifest["init"]["init"] == "calibrated" and manifest["init"]["calibration_sequences"] == 6 and manifest["init"]["calibration_tokens"] > 0
    # the defaults: both sides weighted (6 sequences × 2 sampled answers), ranks spread by the calibrated error
    assert manifest["init"]["output_weighting"] == "full" and manifest["init"]["gradient_draws"] == 12
    assert manifest["init"]["rank_allocation"] == "calibrated" and sum(manifest["init"]["ranks"].values()) > 0
    assert "calibrated init" in (result.export_dir / "report.md").read_text()


def test_allocate_ranks_spends_the_budget_on_the_largest_error_per_parameter():
    from qdpo_core.calibrate import allocate_ranks

    energies = {
        "big": torch.tensor([8.0, 6.0, 4.0, 2.0, 1.0]),
        "small": torch.tensor([0.5, 0.25, 0.1]),
        "cheap": torch.tensor([3.0, 0.2]),  # per parameter its first rank beats big's third
    }
    costs = {"big": 10, "small": 10, "cheap": 2}
    ranks = allocate_ranks(energies, costs, budget=34, max_rank=4)
    assert ranks == {"big": 3, "small": 0, "cheap": 2}
    assert sum(ranks[n] * costs[n] for n in ranks) <= 34
    assert allocate_ranks(energies, costs, budget=1000, max_rank=4) == {"big": 4, "small": 3, "cheap": 2}  # capped by max_rank and by size


def test_calibrated_rank_allocation_leaves_less_output_error_than_uniform_at_the_same_parameter_count(tiny_model_dir, tokenizer):
    from qdpo_core.calibrate import collect_grams, lora_layers, plan_ranks
    from qdpo_core.train import target_layer_names

    teacher, batches = _calibration(tiny_model_dir, tokenizer)
    student, _ = load_quantized(tiny_model_dir, QuantSpec(method="rtn", bits=2, group_size=32), "cpu")
    names = target_layer_names(student, "all-linear")
    assert len(names) == 14
    collector = collect_grams(teacher, names, batches)
    ranks, _ = plan_ranks(student, teacher, names, collector, rank=4)
    modules = dict(student.named_modules())
    costs = {n: modules[n].in_features + modules[n].out_features for n in names}
    budget = 4 * sum(costs.values())
    spent = sum(ranks[n] * costs[n] for n in names)
    assert budget - max(costs.values()) < spent <= budget
    assert len(set(ranks.values())) > 1 and max(ranks.values()) <= 16

    def total_error(layer_ranks: dict[str, int]) -> float:
        """Σ over layers of ‖X(R − BA)ᵀ‖² / ‖XWᵀ‖²: each layer's output error relative to its output."""
        policy = make_policy(
            load_quantized(tiny_model_dir, QuantSpec(method="rtn", bits=2, group_size=32), "cpu")[0], TrainSpec(lora_rank=4), 0, ranks=layer_ranks
        )
        initialise_adapter(policy, teacher, "calibrated", collector=collector, batches=batches)
        total = 0.0
        for name, layer in lora_layers(policy).items():
            w = dict(teacher.named_modules())[name].weight.detach().double()
            gram, _ = collector.gram(name)
            correction = (layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).double()
            error = w - dequantized_weight(layer).double() - correction
            error = error.detach()
            total += float(torch.einsum("oi,ij,oj->", error, gram.double(), error) / torch.einsum("oi,ij,oj->", w, gram.double(), w))
        return total

    assert total_error(ranks) < 0.95 * total_error(dict.fromkeys(names, 4))


def test_a_calibrated_rank_allocation_job_exports_an_adapter_peft_loads_with_its_ranks(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    result = run_pipeline(_spec(tiny_model_dir, rank_allocation="calibrated", lora_rank=4), tmp_path)
    ranks = result.report["init"]["ranks"]
    assert result.report["init"]["rank_allocation"] == "calibrated" and len(set(ranks.values())) > 1
    assert result.report["aligned"]["kl"] < result.report["ptq"]["kl"]
    config = json.loads((result.export_dir / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"]
    weights = load_file(result.export_dir / "adapter" / "adapter_model.safetensors")
    for name, rank in ranks.items():
        key = f"base_model.model.{name}.lora_A.weight"
        if rank:
            assert weights[key].shape[0] == rank
        else:  # a layer left with rank 0 has no adapter
            assert key not in weights
    fresh, _ = load_quantized(tiny_model_dir, QuantSpec(method="rtn", bits=2, group_size=32), "cpu")
    loaded = PeftModel.from_pretrained(fresh, result.export_dir / "adapter")
    layers = {n: m for n, m in loaded.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert {n.removeprefix("base_model.model."): m.r["default"] for n, m in layers.items()} == {n: r for n, r in ranks.items() if r}
    assert all(m.scaling["default"] == pytest.approx(2.0) for m in layers.values())  # alpha follows the rank: alpha / r stays 2


def test_max_layer_rank_caps_the_allocation_and_is_validated(tiny_model_dir, tmp_path):
    from qdpo_core.errors import SpecError

    free = run_pipeline(_spec(tiny_model_dir, lora_rank=1), tmp_path / "free").report["init"]["ranks"]
    capped = run_pipeline(_spec(tiny_model_dir, lora_rank=1, max_layer_rank=1), tmp_path / "capped").report["init"]["ranks"]
    assert max(free.values()) > 1  # the default cap (4 × rank) lets the largest errors take more than the rank
    assert max(capped.values()) == 1 and capped != free
    with pytest.raises(SpecError, match="train.max_layer_rank") as caught:
        _spec(tiny_model_dir, lora_rank=8, max_layer_rank=4)
    assert "lora_rank (8)" in str(caught.value)
    assert _spec(tiny_model_dir, max_layer_rank=128).train.max_layer_rank == 128


def test_rank_allocation_needs_the_calibrated_init(tiny_model_dir):
    from qdpo_core.errors import SpecError

    with pytest.raises(SpecError, match="train.rank_allocation") as caught:
        _spec(tiny_model_dir, rank_allocation="calibrated", init="svd")
    assert "init" in str(caught.value) and "calibrated" in str(caught.value)


def test_output_weighting_minimises_the_weighted_error_and_is_exact_at_full_rank():
    x = _correlated_inputs(400, 32)
    residual = torch.randn(24, 32, generator=torch.Generator().manual_seed(2))
    grads = _correlated_inputs(300, 24, seed=3)  # loss gradients at the outputs: a few directions matter
    right = whitening(x.T @ x, len(x), damping=1e-6)
    left = whitening(grads.T @ grads, len(grads), damping=1e-6)

    def weighted_error(b, a):  # ‖T (R − BA) S‖ / ‖T R S‖, T = Sᵀ of the gradients' Gram matrix
        return float((left[0].T @ (residual - b @ a).double() @ right[0]).norm() / (left[0].T @ residual.double() @ right[0]).norm())

    for rank in (2, 6):
        with_output = weighted_error(*low_rank_factors(residual, rank, whiten=right, output=left))
        inputs_only = weighted_error(*low_rank_factors(residual, rank, whiten=right))
        diagonal = weighted_error(*low_rank_factors(residual, rank, whiten=right, output=torch.diagonal(left[0] @ left[0].T).sqrt()))
        assert with_output < 0.9 * inputs_only, (rank, with_output, inputs_only)
        assert with_output <= diagonal + 1e-9
    assert weighted_error(*low_rank_factors(residual, 24, whiten=right, output=left)) < 1e-6


def test_gradient_grams_are_the_fisher_of_sampled_answers_at_each_layer_output(tiny_model_dir, tokenizer):
    from qdpo_core.calibrate import GradientGramCollector

    teacher, batches = _calibration(tiny_model_dir, tokenizer)
    name = "model.layers.1.mlp.down_proj"
    collector = GradientGramCollector(teacher, [name, "model.layers.0.self_attn.q_proj"], samples=1, seed=5)
    collector.run(batches[:1])
    assert collector.full and collector.draws == 3
    # the same computation by hand: the loss of tokens drawn with the same generator, autograd at the layer output
    batch = batches[0]
    captured = {}
    layer = dict(teacher.named_modules())[name]
    hook = layer.register_forward_hook(lambda _m, _a, output: captured.setdefault("y", output))
    embed_hook = teacher.get_input_embeddings().register_forward_hook(lambda _m, _a, output: output.requires_grad_())
    with torch.enable_grad():
        logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        predicted = logits[:, :-1][batch.response_mask[:, 1:].bool()].float()
        tokens = torch.multinomial(torch.softmax(predicted.detach(), -1), 1, generator=torch.Generator().manual_seed(5))
        (grad,) = torch.autograd.grad(-torch.log_softmax(predicted, -1).gather(-1, tokens).sum(), captured["y"])
    hook.remove()
    embed_hook.remove()
    flat = grad.reshape(-1, grad.shape[-1])[batch.attention_mask.reshape(-1).bool()]
    assert torch.allclose(collector.grams[name], flat.T @ flat, rtol=1e-4, atol=1e-7)
    assert float(torch.diagonal(collector.grams[name]).min()) >= 0 and float(collector.grams[name].abs().max()) > 0
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())  # no weight got a gradient


def test_the_cholesky_whitening_gives_the_corrections_of_the_symmetric_root():
    """`whitening` returns a Cholesky factor, not H^½; both sides must still give the factors H^½ gives."""
    x = _correlated_inputs(400, 32)
    grads = _correlated_inputs(300, 24, seed=3)
    residual = torch.randn(24, 32, generator=torch.Generator().manual_seed(5))

    def symmetric(gram, count, damping=1e-3):  # the textbook form: H^½ and H^-½ from eigh
        h = gram.double() / count
        h = h + damping * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
        values, vectors = torch.linalg.eigh(h)
        return (vectors * values.sqrt()) @ vectors.T, (vectors / values.sqrt()) @ vectors.T

    right, left = whitening(x.T @ x, len(x), 1e-3), whitening(grads.T @ grads, len(grads), 1e-3)
    assert not torch.allclose(right[0], right[0].T)  # triangular, not the symmetric root
    for rank in (3, 8):
        b, a = low_rank_factors(residual, rank, whiten=right, output=left)
        b_root, a_root = low_rank_factors(residual, rank, whiten=symmetric(x.T @ x, len(x)), output=symmetric(grads.T @ grads, len(grads)))
        assert torch.allclose(b @ a, b_root @ a_root, atol=1e-5)
        signs = torch.sign((b * b_root).sum(0))  # each singular pair may come out with the other sign
        assert torch.allclose(b * signs, b_root, atol=1e-5) and torch.allclose(a * signs[:, None], a_root, atol=1e-5)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (16, 16)])
def test_the_truncated_svd_gives_the_top_singular_triplets_of_a_full_svd(shape):
    from qdpo_core.calibrate import _truncated_svd

    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    u, s, vh = _truncated_svd(matrix, 6)
    u_full, s_full, vh_full = torch.linalg.svd(matrix, full_matrices=False)
    assert u.shape == (shape[0], 6) and s.shape == (6,) and vh.shape == (6, shape[1])
    assert torch.allclose(s, s_full[:6], atol=1e-10)
    signs = torch.sign((u * u_full[:, :6]).sum(0))
    assert torch.allclose(u * signs, u_full[:, :6], atol=1e-8) and torch.allclose(vh * signs[:, None], vh_full[:6], atol=1e-8)
    assert torch.allclose(u.T @ u, torch.eye(6, dtype=u.dtype), atol=1e-10)
    zero_u, zero_s, zero_vh = _truncated_svd(torch.zeros(*shape, dtype=torch.float64), 4)  # nothing to correct: factors of zero, no NaN
    assert torch.all(zero_s == 0) and torch.all(torch.isfinite(zero_u)) and torch.all(zero_u @ torch.diag(zero_s) @ zero_vh == 0)


def test_whitening_falls_back_to_the_symmetric_root_where_cholesky_fails():
    indefinite = torch.diag(torch.tensor([4.0, 1.0, -0.5], dtype=torch.float64))  # not positive definite even after damping
    root, inverse = whitening(indefinite, 1, damping=1e-3)
    assert inverse is not None and torch.allclose(root, root.T)  # eigh's symmetric root, with its inverse
    assert torch.allclose(root @ inverse, torch.eye(3, dtype=torch.float64), atol=1e-8)
    factor, none = whitening(torch.eye(3, dtype=torch.float64) * 4, 1, damping=1e-3)
    assert none is None and torch.allclose(factor @ factor.T, torch.eye(3, dtype=torch.float64) * 4 * 1.001)


@pytest.mark.parametrize("method", ["nf4", "rtn"])
def test_a_dora_adapter_starts_where_the_init_puts_it_and_its_scales_round_trip(tiny_model_dir, tokenizer, tmp_path, method):
    """train.dora: the magnitudes are set from base + s·B·A, so the initialised DoRA model computes what the
    plain LoRA init does; once the scales move, the saved adapter reproduces the model on a fresh base; the
    identity reset puts them back to the base's own row lengths."""
    from peft import PeftModel

    from qdpo_core.train import reset_to_identity

    quant = QuantSpec(method=method, bits=2, group_size=32) if method == "rtn" else QuantSpec(method=method)
    teacher, batches = _calibration(tiny_model_dir, tokenizer)
    ids, mask = batches[0].input_ids, batches[0].attention_mask
    logits = {}
    for dora in (False, True):
        student, _ = load_quantized(tiny_model_dir, quant, "cpu")
        policy = make_policy(student, TrainSpec(lora_rank=4, dora=dora), seed=0)
        initialise_adapter(policy, teacher, "svd")
        with torch.no_grad():
            logits[dora] = policy(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        with policy.disable_adapter():
            base = policy(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(logits[False], base, atol=1e-3)  # the init changed the model
    assert torch.allclose(logits[True], logits[False], atol=1e-4)
    scales = {name: p for name, p in policy.named_parameters() if "lora_magnitude_vector" in name}
    assert len(scales) == 14 and all(p.requires_grad and p.ndim == 1 for p in scales.values())
    with torch.no_grad():
        for p in scales.values():
            p.mul_(1.05)  # as training would move them
        moved = policy(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(moved, logits[False], atol=1e-3)
    policy.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    fresh, _ = load_quantized(tiny_model_dir, quant, "cpu")
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids, attention_mask=mask).logits, moved, atol=1e-5)
        reset_to_identity(policy, seed=0)
        assert torch.allclose(policy(input_ids=ids, attention_mask=mask).logits, base, atol=1e-5)
