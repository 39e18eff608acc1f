"""RLAIF: swap-averaged soft labels, the confidence threshold, and the pair source on the tiny model."""

import json

import pytest
import torch

from qdpo_core.config import PipelineSpec
from qdpo_core.errors import Cancelled
from qdpo_core.events import Emitter
from qdpo_core.holder import ModelHolder
from qdpo_core.labelers.base import parse_verdict, softmax
from qdpo_core.labelers.local import LocalLabeler
from qdpo_core.labelers.pairwise import compare, comparison_prompt, swap_average
from qdpo_core.pairs.base import PairContext, run_source
from qdpo_core.pairs.rlaif import RLAIFPairs, keep_pair
from qdpo_core.prompts import builtin_prompts


def test_swap_averaging_cancels_a_constant_position_bias():
    # a labeler that says "1" with 80% whatever it is shown has no preference at all
    assert swap_average([0.8, 0.2], [0.8, 0.2]) == pytest.approx(0.5)
    # a = Response 1 gets 0.9; b = Response 1 gets 0.3, i.e. a (now Response 2) gets 0.7
    assert swap_average([0.9, 0.1], [0.3, 0.7]) == pytest.approx(0.8)
    # antisymmetry: asking about (b, a) swaps the roles of the two asks
    assert swap_average([0.3, 0.7], [0.9, 0.1]) == pytest.approx(1 - 0.8)


@pytest.mark.parametrize(
    "p, threshold, kept",
    [(0.8, 0.1, True), (0.6, 0.1, True), (0.55, 0.1, False), (0.45, 0.1, False), (0.2, 0.1, True), (0.5, 0.0, False), (0.5001, 0.0, True), (0.95, 0.49, False)],
)
def test_pairs_too_close_to_even_are_dropped(p, threshold, kept):
    assert keep_pair(p, threshold) is kept


def test_soft_label_is_the_softmax_over_the_choice_log_probs_and_verdicts_parse_from_text():
    assert softmax([-1.0, -2.0]) == pytest.approx([1 / (1 + torch.e**-1), 1 - 1 / (1 + torch.e**-1)])
    assert parse_verdict("Response 2 is better.", ("1", "2")).probs == [0.0, 1.0]
    assert parse_verdict("**1**", ("1", "2")).probs == [1.0, 0.0]
    unsure = parse_verdict("Both are fine; 12 reasons.", ("1", "2"))
    assert unsure.source == "unparsed" and unsure.probs == [0.5, 0.5]  # "12" is not "1" or "2"
    assert parse_verdict("yes, supported", ("Yes", "No")).probs == [1.0, 0.0]


@pytest.fixture(scope="module")
def labeler(tiny_model_dir, tokenizer):
    from qdpo_core.models import load_full_precision

    return LocalLabeler(load_full_precision(tiny_model_dir, "cpu"), tokenizer, "tiny", batch_size=3)


def test_local_labeler_scores_a_batch_exactly_as_one_at_a_time(labeler):
    conversations = [
        comparison_prompt([{"role": "user", "content": "Short?"}], "a", "b"),
        comparison_prompt(
            [{"role": "user", "content": "A much longer question that pads the others a lot more than they need?"}], "first answer", "second answer"
        ),
        [{"role": "user", "content": "Yes or no?"}],
    ]
    together = labeler.choose(conversations, ("1", "2"))
    alone = [labeler.choose([c], ("1", "2"))[0] for c in conversations]
    for batched, single in zip(together, alone):
        assert batched.logprobs == pytest.approx(single.logprobs, abs=1e-4)
    # and the log-probs are those of plain transformers on the unpadded prompt
    ids = labeler.tokenizer.apply_chat_template(conversations[1], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logps = torch.log_softmax(labeler.model(input_ids=ids).logits[0, -1].float(), -1)
    one, two = (labeler.tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in ("1", "2"))
    assert together[1].logprobs == pytest.approx([float(logps[one]), float(logps[two])], abs=1e-4)


def test_comparisons_are_antisymmetric_although_the_labeler_is_position_biased(labeler):
    question = [{"role": "user", "content": "Give me a tip for sleeping well."}]
    a, b = "Keep a regular schedule.", "Drink coffee at midnight and stare at screens."
    ab, ba = compare(labeler, [(question, a, b), (question, b, a)])
    assert ab.p_first + ba.p_first == pytest.approx(1.0, abs=1e-6)
    # the raw single-order verdicts are not: answer a gets different odds as Response 1 and as Response 2
    assert abs(ab.forward.probs[0] - ab.swapped.probs[1]) > 1e-3


def _spec(tiny_model_dir, **rlaif):
    labeler = {"model": str(tiny_model_dir), "batch_size": 4, **rlaif.pop("labeler", {})}
    return PipelineSpec.from_dict(
        {
            "method": "rlaif",
            "model": {"name": str(tiny_model_dir)},
            "quantization": {"method": "rtn", "bits": 4},
            "generation": {"max_new_tokens": 6, "batch_size": 3},
            "rlaif": {"min_confidence": 0.05, **rlaif, "labeler": labeler},
        }
    )


def _ctx(spec, tokenizer, workdir, should_cancel=lambda: False, models=None):
    return PairContext(spec, tokenizer, models or ModelHolder(spec), Emitter(None), workdir, should_cancel)


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def rlaif_run(tiny_model_dir, tokenizer, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rlaif")
    spec = _spec(tiny_model_dir)
    ctx = _ctx(spec, tokenizer, workdir)
    summary = run_source(RLAIFPairs(), builtin_prompts("train")[:7], ctx, workdir / "pairs.jsonl")
    return spec, ctx, summary, workdir


def test_rlaif_pairs_prefer_what_the_labeler_prefers_and_drop_unsure_ones(rlaif_run):
    spec, ctx, summary, workdir = rlaif_run
    kept = _read(workdir / "pairs.jsonl")
    assert summary["examples"] == len(kept) >= 1
    assert summary["examples"] + summary.get("dropped_low_confidence", 0) + summary.get("dropped_identical", 0) == 7
    assert summary["responses_generated"] == 14  # two sampled answers per prompt
    labelled = 7 - summary.get("dropped_identical", 0)
    assert summary["labels_logprobs"] == 2 * labelled  # every pair asked in both orders
    for example in kept:
        first, second = example["responses"]
        assert first != second and {example["chosen"], example["rejected"]} == {first, second}
        p_first = example["label"]["p_first"]
        # the chosen one is the one the swap-averaged label favours, with at least min_confidence
        assert example["preference"] == pytest.approx(p_first if example["chosen"] == first else 1 - p_first)
        assert example["preference"] - 0.5 >= spec.rlaif.min_confidence
        for side in ("chosen", "rejected"):
            ids = [t for t in example[f"{side}_ids"] if t != ctx.tokenizer.eos_token_id]
            assert ctx.tokenizer.decode(ids, skip_special_tokens=True).strip() == example[side]
    # the stored label is what the labeler says when asked again
    example = kept[0]
    labeler = LocalLabeler(ctx.models.teacher, ctx.tokenizer, "again")
    [again] = compare(labeler, [(example["messages"], *example["responses"])])
    assert again.p_first == pytest.approx(example["label"]["p_first"], abs=1e-5)


def test_rlaif_samples_the_quantized_model_reproducibly_and_resumes_after_a_crash(rlaif_run, tiny_model_dir, tokenizer, tmp_path):
    spec, ctx, summary, workdir = rlaif_run
    chunks = []

    def cancel_after_first_chunk():
        return len(chunks) >= 1

    class Recording(RLAIFPairs):
        def build_chunk(self, records, first_index, ctx):
            out = super().build_chunk(records, first_index, ctx)
            chunks.append(first_index)
            return out

    records = builtin_prompts("train")[:7]
    with pytest.raises(Cancelled):
        run_source(Recording(), records, _ctx(spec, tokenizer, tmp_path, cancel_after_first_chunk, ctx.models), tmp_path / "pairs.jsonl")
    resumed = run_source(Recording(), records, _ctx(spec, tokenizer, tmp_path, models=ctx.models), tmp_path / "pairs.jsonl")
    assert chunks == [0, 3, 6]  # the first chunk was not built twice
    assert _read(tmp_path / "pairs.jsonl") == _read(workdir / "pairs.jsonl")  # same samples, same labels
    assert resumed["examples"] == summary["examples"]


def test_chain_of_thought_keeps_the_rationales_the_verdicts_followed(tiny_model_dir, tokenizer, tmp_path):
    spec = _spec(tiny_model_dir, min_confidence=0.0, labeler={"chain_of_thought": True, "rationale_tokens": 5})
    summary = run_source(RLAIFPairs(), builtin_prompts("train")[:3], _ctx(spec, tokenizer, tmp_path), tmp_path / "pairs.jsonl")
    kept = _read(tmp_path / "pairs.jsonl")
    assert summary["examples"] == len(kept) >= 1
    for example in kept:
        forward_why, swapped_why = example["label"]["rationales"]
        assert forward_why and swapped_why
