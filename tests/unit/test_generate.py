"""Our greedy KV-cached decoding gives the same answers as transformers' generate, rows finishing early included."""

from __future__ import annotations

from collections import Counter

import torch

from qdpo_core.generate import PREFILL_FORWARD_COST, SHARED_PREFIX_MIN, Decoding, greedy_generate, hf_generate, prefill_groups, shared_prefix_length
from qdpo_core.models import load_full_precision


def test_greedy_loop_matches_hf_generate_with_rows_that_finish_early(tiny_model_dir, tokenizer):
    model = load_full_precision(tiny_model_dir, "cpu")
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 4000, (n,), generator=generator).tolist() for n in (3, 11, 6, 19, 8)]
    first = hf_generate(model, tokenizer, prompts, Decoding(max_new_tokens=12))
    # Make a token the model emits often a stop token too, so some rows end early and leave the batch.
    common = Counter(t for r in first for t in r.ids[:6]).most_common(1)[0][0]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, common]
    reference = hf_generate(model, tokenizer, prompts, Decoding(max_new_tokens=12))
    ours = greedy_generate(model, tokenizer, prompts, 12)
    assert [r.ids for r in ours] == [r.ids for r in reference]
    assert [r.finished for r in ours] == [r.finished for r in reference]
    assert [r.text for r in ours] == [r.text for r in reference]
    lengths = sorted(len(r.ids) for r in ours)
    assert lengths[0] < 12 and any(r.finished for r in ours) and any(not r.finished for r in ours)  # both cases occurred


def test_prompts_with_a_common_start_run_it_once_and_give_the_same_answers(tiny_model_dir, tokenizer):
    model = load_full_precision(tiny_model_dir, "cpu")
    generator = torch.Generator().manual_seed(1)
    start = torch.randint(10, 4000, (SHARED_PREFIX_MIN + 4,), generator=generator).tolist()
    # Own parts of different lengths, one of a single token (every row keeps at least one token of its
    # own); short and long ones, so the rows are prefilled in groups and placed into one cache.
    lengths = [5, 1, 90, 3, 2, 97, 4]
    assert len(prefill_groups(lengths)) > 1
    prompts = [start + torch.randint(10, 4000, (n,), generator=generator).tolist() for n in lengths]
    assert shared_prefix_length(prompts) == len(start)
    assert shared_prefix_length([start, start + [7]]) == len(start) - 1  # the shorter prompt keeps its last token
    assert shared_prefix_length([start[: SHARED_PREFIX_MIN - 1] + [1, 2], start[: SHARED_PREFIX_MIN - 1] + [3, 4]]) == 0
    first = hf_generate(model, tokenizer, prompts, Decoding(max_new_tokens=10))
    common = Counter(t for r in first for t in r.ids[:5]).most_common(1)[0][0]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, common]  # some rows end early
    reference = hf_generate(model, tokenizer, prompts, Decoding(max_new_tokens=10))
    ours = greedy_generate(model, tokenizer, prompts, 10)
    assert [r.ids for r in ours] == [r.ids for r in reference]
    assert [r.finished for r in ours] == [r.finished for r in reference]
    assert any(r.finished for r in ours) and any(not r.finished for r in ours)


def _work(groups: list[list[int]], lengths: list[int]) -> int:
    return sum(PREFILL_FORWARD_COST + len(g) * max(lengths[i] for i in g) for g in groups)


def test_prefill_groups_split_rows_by_length_for_the_least_padded_work():
    generator = torch.Generator().manual_seed(2)
    for _ in range(20):
        lengths = torch.randint(1, 120, (int(torch.randint(1, 40, (1,), generator=generator)),), generator=generator).tolist()
        groups = prefill_groups(lengths)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # every row once
        order = [i for g in groups for i in g]
        assert [lengths[i] for i in order] == sorted(lengths)  # consecutive runs of the sorted rows
        everyone, alone = [list(range(len(lengths)))], [[i] for i in range(len(lengths))]
        assert _work(groups, lengths) <= min(_work(everyone, lengths), _work(alone, lengths))
    assert prefill_groups([3, 3, 3, 3]) == [[0, 1, 2, 3]]  # no padding to save: one forward
    assert len(prefill_groups([1, 1, 1, 1, 200, 200])) == 2  # long and short rows apart
