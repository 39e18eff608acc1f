"""run_pipeline end to end on the tiny model: outputs, resume, cancel, bad input before heavy work."""

import json

import pytest
import torch

from qdpo_core.config import PipelineSpec
from qdpo_core.errors import Cancelled, DataError, ModelUnavailable, SpecError
from qdpo_core.events import STAGES
from qdpo_core.export import load_aligned, verify
from qdpo_core.pipeline import run_pipeline


def _spec(model_dir, **overrides):
    data = {
        "model": {"name": str(model_dir)},
        "quantization": {"method": "nf4"},
        "dataset": {"max_train_prompts": 6, "max_eval_prompts": 3},
        "generation": {"max_new_tokens": 6, "batch_size": 4},
        "eval": {"max_new_tokens": 6},
        "train": {"epochs": 2, "batch_size": 3, "learning_rate": 1e-3, "checkpoint_every": 2},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return PipelineSpec.from_dict(data)


def _stages_started(events):
    return [e.stage for e in events if e.type == "stage" and e.message == "started"]


@pytest.fixture(scope="module")
def qdpo_run(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("qdpo-run")
    events = []
    result = run_pipeline(_spec(tiny_model_dir), workdir, on_event=events.append)
    return workdir, events, result


def test_qdpo_run_writes_adapter_manifest_and_report(qdpo_run):
    workdir, events, result = qdpo_run
    assert _stages_started(events) == list(STAGES)
    manifest = verify(result.export_dir)  # every sha256 matches
    assert set(manifest["files"]) == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "report.json", "report.md"}
    assert manifest["method"] == "qdpo" and manifest["quantization"]["method"] == "nf4"
    assert manifest["hyperparameters"]["beta"] == 0.1
    assert manifest["base_model"]["source"] == "local directory" and len(manifest["base_model"]["config_sha256"]) == 64
    # nothing about this machine's layout leaks into what users download or read
    assert str(workdir) not in json.dumps(manifest) + json.dumps(result.report)
    assert not any(str(workdir) in e.message or str(workdir) in json.dumps(e.data) for e in events)
    report = result.report
    assert report["ptq"]["token_flip_rate"] > 0 and report["fp"]["token_flip_rate"] == 0
    assert set(report["gap_closed"]) >= {"token_flip_rate", "kl", "perplexity", "exact_match", "rouge_l"}
    key = "kl"
    assert report["aligned"][key] <= report["ptq"][key] + 1e-6  # never worse than PTQ-only on the selection metric
    assert report["pairs"]["examples"] >= 1
    assert "| token-flip rate" in (result.export_dir / "report.md").read_text()
    checkpoints = [e for e in events if e.type == "checkpoint"]
    assert checkpoints and all("kl" in e.data["metrics"] for e in checkpoints)


def test_exported_adapter_loads_onto_the_quantized_base(qdpo_run):
    from peft import PeftModel

    _, _, result = qdpo_run
    model, tokenizer = load_aligned(result.export_dir, device="cpu")
    assert isinstance(model, PeftModel)
    ids = tokenizer("hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        aligned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    init = result.report["init"]
    if result.report["selected_checkpoint"] == 0 and not (init["kept"] and init["init"] != "identity"):
        assert torch.allclose(aligned, base)
    else:  # a trained checkpoint, or the calibrated init itself: the adapter changes the model
        assert not torch.allclose(aligned, base)


def test_rerun_on_finished_workdir_does_no_work_and_other_spec_is_refused(qdpo_run, tiny_model_dir):
    workdir, _, result = qdpo_run
    events = []
    again = run_pipeline(_spec(tiny_model_dir), workdir, on_event=events.append)
    assert _stages_started(events) == []
    assert again.report == result.report
    with pytest.raises(SpecError, match="different spec"):
        run_pipeline(_spec(tiny_model_dir, seed=1), workdir)


def test_cancel_then_resume_keeps_finished_stages(tiny_model_dir, tmp_path):
    events = []

    def cancel_after_init():
        return any(e.type == "stage" and e.stage == "init" and e.message == "finished" for e in events)

    spec = _spec(tiny_model_dir, method="kd", quantization={"method": "rtn", "bits": 2, "group_size": 32})
    with pytest.raises(Cancelled):
        run_pipeline(spec, tmp_path, on_event=events.append, should_cancel=cancel_after_init)
    assert (tmp_path / "stages" / "init.json").is_file() and not (tmp_path / "stages" / "pairs.json").exists()
    resumed = []
    result = run_pipeline(spec, tmp_path, on_event=resumed.append)
    assert _stages_started(resumed) == ["pairs", "train", "evaluate", "export"]  # the init adapter is reloaded from init/adapter
    assert result.manifest["method"] == "kd"
    assert any(e.type == "metrics" and "kd_loss" in e.data for e in resumed)


def test_user_pairs_method_and_truncation_is_reported(tiny_model_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Question {i}?", "chosen": "A careful, complete answer " * (3 if i == 0 else 1), "rejected": f"no {i}"} for i in range(6)]
    pairs.write_text("\n".join(json.dumps(r) for r in rows))
    events = []
    spec = _spec(tiny_model_dir, method="dpo", dataset={"pairs": str(pairs), "max_response_tokens": 8, "eval_fraction": 0.34, "max_train_prompts": None})
    result = run_pipeline(spec, tmp_path / "run", on_event=events.append)
    assert result.report["pairs"]["responses_truncated"] == 1
    assert any(e.level == "warning" and "max_response_tokens=8" in e.message for e in events)
    assert result.report["eval_prompts"] == 2


def test_malformed_dataset_fails_before_any_model_loads(tiny_model_dir, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": 3}\n')
    events = []
    with pytest.raises(DataError) as info:
        run_pipeline(_spec(tiny_model_dir, dataset={"prompts": str(bad)}), tmp_path / "run", on_event=events.append)
    assert info.value.lines == [{"line": 2, "field": "prompt", "message": "must be a string or a list of {'role', 'content'} messages; got int"}]
    assert _stages_started(events) == ["prepare"]


def test_unknown_model_fails_fast(tmp_path):
    spec = PipelineSpec.from_dict({"model": {"name": "no-such-model"}})
    with pytest.raises(ModelUnavailable, match="unknown model 'no-such-model'"):
        run_pipeline(spec, tmp_path)


def test_all_pairs_identical_is_a_clear_error(tiny_model_dir, tmp_path):
    # 8-bit RTN with one group per row barely moves this model: greedy answers all coincide
    spec = _spec(tiny_model_dir, quantization={"method": "rtn", "bits": 8, "group_size": 32}, dataset={"max_train_prompts": 2})
    with pytest.raises(SpecError, match="every pair was dropped"):
        run_pipeline(spec, tmp_path)


def test_bad_reference_passages_and_unknown_labeler_fail_before_any_model_loads(tiny_model_dir, tmp_path):
    passages = tmp_path / "passages.jsonl"
    passages.write_text('{"text": "Paris is in France."}\n{"txt": "typo"}\n')
    events = []
    spec = _spec(
        tiny_model_dir, method="factuality", factuality={"scorer": "reference", "references": str(passages), "labeler": {"model": str(tiny_model_dir)}}
    )
    with pytest.raises(DataError, match="factuality.references: line 2: field 'txt'"):
        run_pipeline(spec, tmp_path / "a", on_event=events.append)
    assert _stages_started(events) == ["prepare"]
    spec = _spec(tiny_model_dir, method="rlaif", rlaif={"labeler": {"model": "no-such-labeler"}})
    with pytest.raises(ModelUnavailable, match="no-such-labeler"):
        run_pipeline(spec, tmp_path / "b", on_event=events.append)


def test_resume_follows_input_contents_not_paths(tiny_model_dir, tmp_path):
    """A re-queued job may run on a worker that mounts the artifact store elsewhere."""
    first, moved = tmp_path / "a" / "prompts.jsonl", tmp_path / "b" / "prompts.jsonl"
    for path in (first, moved):
        path.parent.mkdir()
        path.write_text('{"prompt": "one"}\n{"prompt": "two"}\n')
    stop = lambda: True  # noqa: E731 - claim the directory, then stop before the first stage
    with pytest.raises(Cancelled):
        run_pipeline(_spec(tiny_model_dir, dataset={"prompts": str(first)}), tmp_path / "run", should_cancel=stop)
    with pytest.raises(Cancelled):  # same content elsewhere: the same run
        run_pipeline(_spec(tiny_model_dir, dataset={"prompts": str(moved)}, model={"device": "cpu"}), tmp_path / "run", should_cancel=stop)
    moved.write_text('{"prompt": "one"}\n{"prompt": "changed"}\n')
    with pytest.raises(SpecError, match="different input files"):
        run_pipeline(_spec(tiny_model_dir, dataset={"prompts": str(moved)}), tmp_path / "run", should_cancel=stop)


def test_method_auto_tries_every_candidate_from_the_init_and_exports_the_best(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    spec = _spec(tiny_model_dir, method="auto", quantization={"method": "rtn", "bits": 2, "group_size": 32}, train={"epochs": 1, "learning_rate": 3e-3})
    events = []
    result = run_pipeline(spec, tmp_path, on_event=events.append)
    auto = result.report["auto"]
    names = [c["name"] for c in auto["candidates"]]
    assert names == ["init", "kd", "qdpo+nll"]
    assert auto["winner"] == min(auto["candidates"], key=lambda c: c["metrics"]["kl"])["name"]
    init = next(c for c in auto["candidates"] if c["name"] == "init")
    assert init["steps"] == 0 and init["metrics"]["kl"] == pytest.approx(result.report["init"]["metrics"]["kl"])
    assert all(c["steps"] > 0 for c in auto["candidates"] if c["name"] != "init")
    exported = load_file(result.export_dir / "adapter" / "adapter_model.safetensors")
    winner = load_file(tmp_path / "train" / auto["winner"] / "best" / "adapter_model.safetensors")
    assert exported.keys() == winner.keys() and all(torch.equal(exported[k], winner[k]) for k in exported)
    assert result.report["aligned"]["kl"] == pytest.approx(min(c["metrics"]["kl"] for c in auto["candidates"]), rel=1e-4)
    markdown = (result.export_dir / "report.md").read_text()
    assert f"Method auto: {auto['winner']} won" in markdown and "qdpo+nll" in markdown
    assert any("wins on held-out kl" in e.message for e in events)


def test_kd_with_sampled_answers_distils_on_the_greedy_answer_and_fp_samples(tiny_model_dir, tmp_path):
    spec = _spec(tiny_model_dir, method="kd", quantization={"method": "rtn", "bits": 2, "group_size": 32}, train={"epochs": 1, "kd_sampled_answers": 2})
    events = []
    run_pipeline(spec, tmp_path, on_event=events.append)
    examples = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    greedy = {tuple(r["prompt_ids"]): r["ids"] for r in map(json.loads, (tmp_path / "init" / "fp_answers.jsonl").read_text().splitlines())}
    first = [e for e in examples if e["sample"] == 0]
    sampled = [e for e in examples if e["sample"] > 0]
    assert len(first) == 6 and all(e["chosen_ids"] == greedy[tuple(e["prompt_ids"])] for e in first)
    assert {e["sample"] for e in sampled} == {1, 2} and len(sampled) >= 10  # empty sampled answers are left out
    assert any(e["chosen_ids"] != greedy[tuple(e["prompt_ids"])] for e in sampled)  # sampled, not greedy again
    steps = [e.total for e in events if e.type == "metrics"]
    assert steps and steps[0] == -(-len(examples) // 3)  # every sequence is trained on (batch 3, one epoch)


def test_sampled_distillation_answers_are_refused_for_other_methods(tiny_model_dir):
    with pytest.raises(SpecError) as raised:
        _spec(tiny_model_dir, method="qdpo", train={"kd_sampled_answers": 2})
    assert raised.value.param == "train.kd_sampled_answers"
