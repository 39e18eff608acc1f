"""Pair sources: QDPO drops identical pairs and counts them; building resumes after a crash."""

import json

import pytest

from qdpo_core.config import PipelineSpec
from qdpo_core.errors import Cancelled
from qdpo_core.events import Emitter
from qdpo_core.holder import ModelHolder
from qdpo_core.pairs.base import PairContext, run_source
from qdpo_core.pairs.qdpo import QdpoPairs
from qdpo_core.pairs.user import UserPairs
from qdpo_core.prompts import builtin_prompts


def _ctx(spec, tokenizer, workdir, should_cancel=lambda: False):
    return PairContext(spec, tokenizer, ModelHolder(spec), Emitter(None), workdir, should_cancel)


def test_qdpo_pairs_are_fp_chosen_quantized_rejected_and_identical_ones_dropped(tiny_model_dir, tokenizer, tmp_path):
    spec = PipelineSpec.from_dict(
        {"model": {"name": str(tiny_model_dir)}, "quantization": {"method": "rtn", "bits": 8}, "generation": {"max_new_tokens": 6, "batch_size": 4}}
    )
    ctx = _ctx(spec, tokenizer, tmp_path)
    records = builtin_prompts("train")[:8]
    summary = run_source(QdpoPairs(), records, ctx, tmp_path / "pairs.jsonl")
    kept = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert summary["prompts"] == 8
    assert summary["examples"] == len(kept)
    assert summary["examples"] + summary.get("dropped_identical", 0) == 8
    assert summary["responses_generated"] == 16 and summary["responses_cut"] <= 16
    # 8-bit RTN barely changes a model: most answers coincide, and those pairs must be gone
    assert summary.get("dropped_identical", 0) >= 1
    assert all(example["chosen_ids"] != example["rejected_ids"] for example in kept)
    # chosen really is the FP model's greedy answer
    from qdpo_core.generate import Decoding, generate

    first = kept[0]
    fp_answer = generate(ctx.models.teacher, tokenizer, [first["prompt_ids"]], Decoding(max_new_tokens=6))[0]
    assert fp_answer.ids == first["chosen_ids"]


class CountingSource(UserPairs):
    """User pairs in chunks of two, counting how many chunks it was asked to build."""

    def __init__(self):
        self.calls = 0

    def chunk_size(self, ctx):
        return 2

    def build_chunk(self, records, first_index, ctx):
        self.calls += 1
        return super().build_chunk(records, first_index, ctx)


def _pairs(n):
    return [{"messages": [{"role": "user", "content": f"q{i}"}], "chosen": f"good {i}", "rejected": f"bad {i}" if i % 3 else f"good {i}"} for i in range(n)]


def test_pair_building_resumes_after_interruption_and_survives_a_torn_line(tokenizer, tmp_path):
    spec = PipelineSpec.from_dict({"method": "dpo", "dataset": {"pairs": "x.jsonl"}})
    records = _pairs(7)
    first = CountingSource()
    with pytest.raises(Cancelled):
        run_source(first, records, _ctx(spec, tokenizer, tmp_path, lambda: first.calls >= 2), tmp_path / "pairs.jsonl")
    assert first.calls == 2
    with (tmp_path / "pairs.partial.jsonl").open("a") as handle:
        handle.write('{"index": 4, "messages": [{"ro')  # a crash in the middle of writing the next chunk
    resumed = CountingSource()
    summary = run_source(resumed, records, _ctx(spec, tokenizer, tmp_path), tmp_path / "pairs.jsonl")
    assert resumed.calls == 2  # only the chunks of records 4-5 and 6 are built again
    kept = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert [e["index"] for e in kept] == [1, 2, 4, 5]  # 0, 3, 6 have chosen == rejected
    assert summary["dropped_identical"] == 3 and summary["examples"] == 4


def test_user_pairs_count_truncated_answers(tokenizer, tmp_path):
    spec = PipelineSpec.from_dict({"method": "dpo", "dataset": {"pairs": "x.jsonl", "max_response_tokens": 4}})
    records = [{"messages": [{"role": "user", "content": "q"}], "chosen": "one two three four five six", "rejected": "no"}]
    summary = run_source(UserPairs(), records, _ctx(spec, tokenizer, tmp_path), tmp_path / "pairs.jsonl")
    assert summary["responses_truncated"] == 1
    example = json.loads((tmp_path / "pairs.jsonl").read_text())
    assert len(example["chosen_ids"]) == 4


@pytest.mark.parametrize("rejected_model", ["init", "ptq"])
def test_rejected_answers_come_from_the_model_being_repaired_or_ptq_only(tiny_model_dir, tokenizer, tmp_path, rejected_model):
    from qdpo_core.calibrate import initialise_adapter
    from qdpo_core.generate import Decoding, generate
    from qdpo_core.train import make_policy

    spec = PipelineSpec.from_dict(
        {
            "model": {"name": str(tiny_model_dir)},
            "quantization": {"method": "rtn", "bits": 2, "group_size": 32},
            "generation": {"max_new_tokens": 6, "batch_size": 4, "rejected_model": rejected_model},
        }
    )
    ctx = _ctx(spec, tokenizer, tmp_path)
    ctx.models.policy = make_policy(ctx.models.student, spec.train, 0)
    initialise_adapter(ctx.models.policy, ctx.models.teacher, "svd")  # a non-trivial adapter
    run_source(QdpoPairs(), builtin_prompts("train")[:4], ctx, tmp_path / "pairs.jsonl")
    example = json.loads((tmp_path / "pairs.jsonl").read_text().splitlines()[0])
    decoding = Decoding(max_new_tokens=6)
    with_adapter = generate(ctx.models.policy, tokenizer, [example["prompt_ids"]], decoding)[0].ids
    with ctx.models.policy.disable_adapter():
        ptq_only = generate(ctx.models.policy, tokenizer, [example["prompt_ids"]], decoding)[0].ids
    assert with_adapter != ptq_only  # the adapter changes the answer, so the two sources can be told apart
    assert example["rejected_ids"] == (with_adapter if rejected_model == "init" else ptq_only)
