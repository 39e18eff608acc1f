"""Our greedy KV-cached decoding gives the same answers as transformers' generate, rows finishing early included."""

from __future__ import annotations

from collections import Counter

import torch

from qdpo_core.generate import Decoding, greedy_generate, hf_generate
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
