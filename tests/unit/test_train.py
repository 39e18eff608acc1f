"""The trainer: learning happens, resume is exact, accumulation is exact, the export never loses to PTQ."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qdpo_core.config import QuantSpec, TrainSpec
from qdpo_core.errors import Cancelled
from qdpo_core.events import Emitter
from qdpo_core.quantize import load_quantized
from qdpo_core.tokens import encode_prompt
from qdpo_core.train import Trainer, make_policy


@pytest.fixture(scope="module")
def examples(tokenizer):
    """Eight preference pairs over random token answers (the trainer only sees token ids)."""
    generator = torch.Generator().manual_seed(0)
    result = []
    for i in range(8):
        prompt = encode_prompt(tokenizer, [{"role": "user", "content": f"Question number {i}?"}], 64).ids
        chosen = torch.randint(10, 5000, (6,), generator=generator).tolist() + [tokenizer.eos_token_id]
        rejected = torch.randint(10, 5000, (5,), generator=generator).tolist() + [tokenizer.eos_token_id]
        result.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return result


def _trainer(tiny_model_dir, tokenizer, examples, workdir, spec, objective="dpo", should_cancel=lambda: False, evaluate=None, baseline=None, events=None):
    student, _ = load_quantized(tiny_model_dir, QuantSpec(method="nf4"), "cpu")
    teacher = None
    if objective == "kd" or spec.kd_weight:
        from qdpo_core.models import load_full_precision

        teacher = load_full_precision(tiny_model_dir, "cpu")
    policy = make_policy(student, spec, seed=0)
    emitter = Emitter(events.append if events is not None else None)
    return Trainer(policy, teacher, tokenizer, examples, spec, objective, workdir, evaluate, baseline or {}, emitter, should_cancel, seed=0)


def _adapter(path: Path) -> dict:
    return load_file(path / "adapter_model.safetensors")


def test_dpo_training_raises_reward_accuracy_and_lowers_loss(tiny_model_dir, tokenizer, examples, tmp_path):
    spec = TrainSpec(epochs=6, batch_size=4, learning_rate=2e-3, warmup_ratio=0, select_best=False)
    events = []
    result = _trainer(tiny_model_dir, tokenizer, examples, tmp_path, spec, events=events).run()
    steps = [e for e in events if e.type == "metrics"]
    assert len(steps) == result.total_steps == 12
    assert steps[0].data["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert steps[-1].data["loss"] < 0.5 and steps[-1].data["reward_accuracy"] == 1.0
    assert steps[-1].data["reward_margin"] > 0
    for key in ("chosen_reward", "rejected_reward", "learning_rate", "epoch", "eta_seconds"):
        assert key in steps[-1].data
    reference = json.loads((tmp_path / "reference_logps.json").read_text())
    assert len(reference["chosen"]) == 8 and all(v < 0 for v in reference["chosen"])


def test_resume_from_checkpoint_reaches_the_same_adapter(tiny_model_dir, tokenizer, examples, tmp_path):
    spec = TrainSpec(epochs=2, batch_size=2, learning_rate=1e-3, lora_dropout=0.1, checkpoint_every=3, select_best=False, nll_weight=0.2)
    straight = _trainer(tiny_model_dir, tokenizer, examples, tmp_path / "straight", spec).run()
    steps_seen = []

    def stop_at_five():
        return len(steps_seen) >= 5

    events = []
    interrupted = _trainer(tiny_model_dir, tokenizer, examples, tmp_path / "resumed", spec, should_cancel=stop_at_five, events=events)
    interrupted.emitter.on_event = lambda e: steps_seen.append(e) if e.type == "metrics" else None
    with pytest.raises(Cancelled):
        interrupted.run()
    assert len(steps_seen) == 5  # stopped mid-epoch, between checkpoints (3 and 6)
    events = []
    resumed = _trainer(tiny_model_dir, tokenizer, examples, tmp_path / "resumed", spec, events=events).run()
    assert [e.step for e in events if e.type == "metrics"] == [6, 7, 8]  # continued, not restarted at step 0
    assert resumed.steps == straight.steps == 8
    a, b = _adapter(tmp_path / "straight" / "best"), _adapter(tmp_path / "resumed" / "best")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), (name, (a[name] - b[name]).abs().max())
    assert resumed.history[-1]["loss"] == pytest.approx(straight.history[-1]["loss"], abs=1e-5)


def test_gradient_accumulation_equals_a_larger_batch(tiny_model_dir, tokenizer, examples, tmp_path):
    big = TrainSpec(epochs=1, batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-3, select_best=False)
    small = TrainSpec(epochs=1, batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-3, select_best=False)
    _trainer(tiny_model_dir, tokenizer, examples, tmp_path / "big", big).run()
    _trainer(tiny_model_dir, tokenizer, examples, tmp_path / "small", small).run()
    a, b = _adapter(tmp_path / "big" / "best"), _adapter(tmp_path / "small" / "best")
    for name in a:  # equal up to float32 summation order
        assert torch.allclose(a[name], b[name], atol=1e-5), (name, (a[name] - b[name]).abs().max())


def test_best_checkpoint_is_kept_and_identity_when_nothing_beats_ptq(tiny_model_dir, tokenizer, examples, tmp_path):
    spec = TrainSpec(epochs=3, batch_size=4, learning_rate=1e-3, checkpoint_every=1, early_stopping_patience=2)
    calls = []

    def never_better(model):  # a held-out score that only gets worse: nothing may be exported but step 0
        calls.append(1)
        return {"kl": 1.0 + len(calls), "token_flip_rate": 0.5, "perplexity": 10.0}

    events = []
    result = _trainer(
        tiny_model_dir, tokenizer, examples, tmp_path, spec, evaluate=never_better, baseline={"kl": 1.0, "token_flip_rate": 0.5}, events=events
    ).run()
    assert result.best_step == 0
    assert result.stopped_early and result.steps == 2  # patience 2: two evaluations without improvement
    best = _adapter(tmp_path / "best")
    assert all(float(t.abs().max()) == 0 for name, t in best.items() if "lora_B" in name)  # identity adapter
    assert any(e.level == "warning" and "stopping early" in e.message for e in events)


def test_best_checkpoint_tracks_the_lowest_held_out_metric(tiny_model_dir, tokenizer, examples, tmp_path):
    spec = TrainSpec(epochs=2, batch_size=4, learning_rate=1e-3, checkpoint_every=1, early_stopping_patience=0)
    scores = iter([0.9, 0.7, 0.8, 0.95])

    def held_out(model):
        return {"kl": next(scores), "token_flip_rate": 0.3}

    events = []
    result = _trainer(tiny_model_dir, tokenizer, examples, tmp_path, spec, evaluate=held_out, baseline={"kl": 1.0}, events=events).run()
    assert result.best_step == 2 and result.best_metrics["kl"] == 0.7
    checkpoint_events = [e for e in events if e.type == "checkpoint"]
    assert [e.data["is_best"] for e in checkpoint_events] == [True, True, False, False]
    saved = _adapter(tmp_path / "checkpoints" / "step-000004")  # the latest is kept for resume ...
    best = _adapter(tmp_path / "best")  # ... but the export reads the best one
    assert any(not torch.equal(saved[k], best[k]) for k in best)


def test_kd_objective_pulls_the_student_towards_the_teacher(tiny_model_dir, tokenizer, examples, tmp_path):
    spec = TrainSpec(epochs=4, batch_size=4, learning_rate=3e-3, warmup_ratio=0, select_best=False)
    events = []
    _trainer(tiny_model_dir, tokenizer, examples, tmp_path, spec, objective="kd", events=events).run()
    kd = [e.data["kd_loss"] for e in events if e.type == "metrics"]
    assert kd[-1] < kd[0] * 0.8


def test_on_policy_distillation_trains_on_the_models_own_answers(tiny_model_dir, tokenizer, examples, tmp_path):
    spec = TrainSpec(epochs=2, batch_size=4, learning_rate=3e-3, warmup_ratio=0, select_best=False, kd_on_policy_fraction=0.5)
    events = []
    trainer = _trainer(tiny_model_dir, tokenizer, examples, tmp_path, spec, objective="kd", events=events)
    trainer.max_new_tokens = 5
    trainer.run()
    for epoch in (0, 1):
        answers = json.loads((tmp_path / "on_policy" / f"epoch-{epoch:03d}.json").read_text())
        assert len(answers) == 4  # half of the 8 examples, the model's own greedy answers of at most 5 tokens
        assert all(1 <= len(ids) <= 5 for ids in answers.values())
        assert all(ids != examples[int(i)]["chosen_ids"] for i, ids in answers.items())
    assert sum("on-policy" in e.message for e in events if e.type == "log") == 2
    # the batches really used them: with the model's own answers the KD loss differs from the FP-answer loss
    own = {int(i): ids for i, ids in json.loads((tmp_path / "on_policy" / "epoch-001.json").read_text()).items()}
    indices = sorted(own)
    trainer.on_policy = {}
    with torch.no_grad():
        fp_only, _ = trainer.batch_loss(indices, None)
        trainer.on_policy = own
        mixed, _ = trainer.batch_loss(indices, None)
    assert not torch.isclose(fp_only, mixed)


def test_teacher_logits_reused_across_epochs_give_the_same_training(tiny_model_dir, tokenizer, examples, tmp_path):
    spec = TrainSpec(epochs=2, batch_size=4, learning_rate=3e-3, warmup_ratio=0, select_best=False, kd_weight=0.5)
    for objective in ("kd", "dpo"):
        cached = _trainer(tiny_model_dir, tokenizer, examples, tmp_path / f"{objective}-cached", spec, objective=objective)
        cached.run()
        assert len(cached.teacher_cache) == len(examples)  # filled in epoch 1, read in epoch 2
        plain = _trainer(tiny_model_dir, tokenizer, examples, tmp_path / f"{objective}-plain", spec, objective=objective)
        plain.teacher_cache_bytes = 0  # nothing fits: the teacher runs every step
        plain.run()
        assert plain.teacher_cache == {}
        a, b = _adapter(tmp_path / f"{objective}-cached" / "best"), _adapter(tmp_path / f"{objective}-plain" / "best")
        for name in a:
            assert torch.allclose(a[name], b[name], atol=1e-6), (objective, name)


def test_kd_on_all_positions_matches_the_prompt_too(tiny_model_dir, tokenizer, examples, tmp_path):
    answer_only = _trainer(tiny_model_dir, tokenizer, examples, tmp_path / "a", TrainSpec(epochs=1, select_best=False), objective="kd")
    everywhere = _trainer(tiny_model_dir, tokenizer, examples, tmp_path / "b", TrainSpec(epochs=1, select_best=False, kd_positions="all"), objective="kd")
    with torch.no_grad():
        answer_only.batch_loss([0, 1], None)
        everywhere.batch_loss([0, 1], None)
    matched = {i: t.shape[0] for i, t in everywhere.teacher_cache.items()}
    answers = {i: t.shape[0] for i, t in answer_only.teacher_cache.items()}
    for i in (0, 1):
        assert answers[i] == len(examples[i]["chosen_ids"])
        assert matched[i] == len(examples[i]["prompt_ids"]) + len(examples[i]["chosen_ids"]) - 1  # every token but the first


def test_top1_hinge_is_added_to_the_distillation_loss_with_its_weight(tiny_model_dir, tokenizer, examples, tmp_path):
    losses = {}
    for weight in (0.0, 1.0, 3.0):
        trainer = _trainer(
            tiny_model_dir, tokenizer, examples, tmp_path / str(weight), TrainSpec(epochs=1, select_best=False, kd_top1_weight=weight), objective="kd"
        )
        with torch.no_grad():
            losses[weight], _ = trainer.batch_loss([0, 1, 2, 3], None)
    hinge = losses[1.0] - losses[0.0]
    assert hinge > 0  # the nf4 tiny model does not rank every FP top-1 token first by the FP margin
    assert torch.isclose(losses[3.0] - losses[0.0], 3 * hinge, rtol=1e-4)


def test_epoch_order_covers_every_example_once_with_little_padding(tiny_model_dir, tokenizer, tmp_path):
    generator = torch.Generator().manual_seed(1)
    many = []
    for _ in range(64):
        prompt = encode_prompt(tokenizer, [{"role": "user", "content": "word " * int(torch.randint(1, 40, (1,), generator=generator))}], 128).ids
        many.append({"prompt_ids": prompt, "chosen_ids": [5] * int(torch.randint(1, 30, (1,), generator=generator)), "rejected_ids": [6, 7]})
    trainer = _trainer(tiny_model_dir, tokenizer, many, tmp_path, TrainSpec(batch_size=4))
    order = trainer.epoch_order(0)
    assert sorted(i for batch in order for i in batch) == list(range(64))
    assert order == trainer.epoch_order(0) and order != trainer.epoch_order(1)  # reproducible per epoch, different across epochs

    def padding(batches):
        return sum(max(map(trainer._length, b)) * len(b) - sum(map(trainer._length, b)) for b in batches)

    shuffled = torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist()
    assert padding(order) < 0.5 * padding([shuffled[i : i + 4] for i in range(0, 64, 4)])


def test_compiled_layers_train_the_same_adapter_as_the_plain_ones(tiny_model_dir, tokenizer, examples, tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    plain = TrainSpec(epochs=2, batch_size=3, learning_rate=1e-3, select_best=False, nll_weight=0.2, compile="off")
    compiled = TrainSpec(epochs=2, batch_size=3, learning_rate=1e-3, select_best=False, nll_weight=0.2, compile="on")
    a_run = _trainer(tiny_model_dir, tokenizer, examples, tmp_path / "plain", plain).run()
    events = []
    trainer = _trainer(tiny_model_dir, tokenizer, examples, tmp_path / "compiled", compiled, events=events)
    b_run = trainer.run()
    assert not a_run.compiled and b_run.compiled
    assert any("torch.compile'd decoder layers" in e.message for e in events)
    assert all(type(layer).__name__ != "OptimizedModule" for layer in trainer.policy.get_base_model().model.layers)  # swapped back
    a, b = _adapter(tmp_path / "plain" / "best"), _adapter(tmp_path / "compiled" / "best")
    assert a.keys() == b.keys()
    moved = max(a[n].abs().max().item() for n in a if "lora_B" in n)
    assert moved > 1e-4  # B starts at 0: training changed it, so the comparison below says something
    for name in a:  # batches of 3 and 2: two shapes through one dynamic-shape graph
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-3), (name, (a[name] - b[name]).abs().max())
    assert [round(h["loss"], 4) for h in a_run.history] == [round(h["loss"], 4) for h in b_run.history]


def test_a_failing_compiler_falls_back_to_the_plain_layers(tiny_model_dir, tokenizer, examples, tmp_path, monkeypatch):
    import torch._dynamo
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    monkeypatch.setattr(inductor_config.cpp, "cxx", (str(tmp_path / "no-such-compiler"),))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    spec = TrainSpec(epochs=1, batch_size=4, learning_rate=1e-3, select_best=False, compile="on")
    events = []
    result = _trainer(tiny_model_dir, tokenizer, examples, tmp_path / "run", spec, events=events).run()
    torch._dynamo.reset()
    assert not result.compiled and result.steps == 2
    assert any(e.level == "warning" and "torch.compile failed" in e.message for e in events)
    assert all(h["loss"] == h["loss"] for h in result.history)  # finite: the failed step was redone, not half-applied


def test_layers_of_different_ranks_are_not_compiled(tiny_model_dir, tokenizer, examples, tmp_path):
    from qdpo_core.train import target_layer_names, uniform_layers

    student, _ = load_quantized(tiny_model_dir, QuantSpec(method="nf4"), "cpu")
    names = target_layer_names(student, "all-linear")
    assert uniform_layers(make_policy(student, TrainSpec(lora_rank=4), seed=0)) is not None
    student, _ = load_quantized(tiny_model_dir, QuantSpec(method="nf4"), "cpu")
    ranks = {name: 4 if i % 3 else 8 for i, name in enumerate(names)}  # as the calibrated allocation gives them
    policy = make_policy(student, TrainSpec(lora_rank=4), seed=0, ranks=ranks)
    assert uniform_layers(policy) is None
    events = []
    spec = TrainSpec(epochs=1, batch_size=4, learning_rate=1e-3, select_best=False, compile="on")
    trainer = Trainer(policy, None, tokenizer, examples, spec, "dpo", tmp_path, None, {}, Emitter(events.append), seed=0)
    result = trainer.run()
    assert not result.compiled and result.steps == 2
    assert any(e.level == "warning" and "ranks differ" in e.message for e in events)


def test_trained_norm_scales_are_saved_and_reload_onto_a_fresh_base(tiny_model_dir, tokenizer, examples, tmp_path):
    from peft import PeftModel

    spec = TrainSpec(epochs=3, batch_size=4, learning_rate=3e-3, warmup_ratio=0, select_best=False, train_norms=True)
    trainer = _trainer(tiny_model_dir, tokenizer, examples, tmp_path, spec, objective="kd")
    result = trainer.run()
    saved = _adapter(result.best_dir)
    norms = {name: t for name, t in saved.items() if "norm" in name}
    assert norms and all(t.ndim == 1 for t in norms.values())  # every RMSNorm scale of the model, final one included
    assert any(name.startswith("base_model.model.model.norm") for name in norms)
    assert any(float((t - 1).abs().max()) > 1e-4 for t in norms.values())  # the tiny model's scales start at 1: they were trained
    fresh, _ = load_quantized(tiny_model_dir, QuantSpec(method="nf4"), "cpu")
    loaded = PeftModel.from_pretrained(fresh, str(result.best_dir)).eval()
    ids = torch.tensor([examples[0]["prompt_ids"] + examples[0]["chosen_ids"]])
    trainer.policy.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, trainer.policy(ids).logits, atol=1e-5)
        with loaded.disable_adapter():  # the base keeps its own scales
            plain = loaded(ids).logits
        assert not torch.allclose(plain, trainer.policy(ids).logits, atol=1e-3)


def test_lora_plus_gives_b_and_norm_scales_the_higher_learning_rate(tiny_model_dir, tokenizer):
    from qdpo_core.train import make_optimizer

    student, _ = load_quantized(tiny_model_dir, QuantSpec(method="nf4"), "cpu")
    spec = TrainSpec(learning_rate=1e-4, lora_plus_ratio=8, train_norms=True)
    policy = make_policy(student, spec, seed=0)
    optimizer = make_optimizer(policy, spec)
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    trained = [(name, p) for name, p in policy.named_parameters() if p.requires_grad]
    assert len(rate) == len(trained)  # every trained weight is in exactly one group
    for name, p in trained:
        expected = 1e-4 if "lora_A" in name else 8e-4
        assert rate[id(p)] == pytest.approx(expected), name
    plain = make_optimizer(policy, TrainSpec(learning_rate=1e-4, train_norms=True))
    assert {g["lr"] for g in plain.param_groups} == {1e-4}


def test_dora_scales_are_trained_and_saved(tiny_model_dir, tokenizer, examples, tmp_path):
    spec = TrainSpec(epochs=2, batch_size=4, learning_rate=3e-3, warmup_ratio=0, select_best=False, dora=True)
    trainer = _trainer(tiny_model_dir, tokenizer, examples, tmp_path, spec, objective="kd")
    start = {name: p.detach().clone() for name, p in trainer.policy.named_parameters() if "lora_magnitude_vector" in name}
    result = trainer.run()
    saved = {name: t for name, t in _adapter(result.best_dir).items() if "lora_magnitude_vector" in name}
    assert len(saved) == len(start) == 14
    for name, value in start.items():  # saved under PEFT's own key (without the adapter name)
        key = name.removesuffix(".default.weight")
        assert not torch.allclose(saved[key], value, atol=1e-5), name


def test_an_adapter_saved_without_the_dora_scales_is_refused_not_half_loaded(tiny_model_dir, tmp_path):
    from qdpo_core.checkpoint import load_adapter_weights

    plain = make_policy(load_quantized(tiny_model_dir, QuantSpec(method="nf4"), "cpu")[0], TrainSpec(lora_rank=4), seed=0)
    plain.save_pretrained(tmp_path / "plain", save_embedding_layers=False)
    dora = make_policy(load_quantized(tiny_model_dir, QuantSpec(method="nf4"), "cpu")[0], TrainSpec(lora_rank=4, dora=True), seed=1)
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        load_adapter_weights(dora, tmp_path / "plain")
    load_adapter_weights(plain, tmp_path / "plain")  # its own file loads
    dora.save_pretrained(tmp_path / "dora", save_embedding_layers=False)
    load_adapter_weights(dora, tmp_path / "dora")
