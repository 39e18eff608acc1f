"""Metric definitions on constructed logits and texts."""

import math

import pytest
import torch

from qdpo_core.evaluate import agreement_metrics, gap_closed, position_stats, rouge_l, summarize
from qdpo_core.tokens import collate


def _logits(rows):
    return torch.log(torch.tensor([rows], dtype=torch.float32))  # (1, T, V)


def test_flips_kl_and_perplexity_on_response_positions_only():
    batch = collate([[0]], [[1, 0]], pad_id=0)  # tokens 0 1 0: positions 0 and 1 predict response tokens
    fp = _logits([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    q = _logits([[0.3, 0.7], [0.4, 0.6], [0.9, 0.1]])  # flips at position 1 only; last position is not scored
    stats = position_stats(fp, q, batch)
    assert stats["count"] == 2
    assert stats["flips"] == 1
    kl = (0.2 * math.log(0.2 / 0.3) + 0.8 * math.log(0.8 / 0.7)) + (0.6 * math.log(0.6 / 0.4) + 0.4 * math.log(0.4 / 0.6))
    assert stats["kl"] == pytest.approx(kl, rel=1e-5)
    nll = -math.log(0.7) - math.log(0.4)  # targets: token 1 then token 0
    assert stats["nll"] == pytest.approx(nll, rel=1e-5)
    summary = summarize(stats)
    assert summary["token_flip_rate"] == 0.5
    assert summary["perplexity"] == pytest.approx(math.exp(nll / 2), rel=1e-5)


def test_identical_models_have_no_flips_and_zero_kl():
    batch = collate([[0, 1]], [[1, 1, 0]], pad_id=0)
    logits = torch.randn(1, 5, 7)
    summary = summarize(position_stats(logits, logits.clone(), batch))
    assert summary["token_flip_rate"] == 0 and summary["kl"] == pytest.approx(0, abs=1e-6)


def test_rouge_l():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("the cat sat", "dogs run fast") == 0.0
    # LCS of "a b c d" and "a c d e" is "a c d": P = R = 3/4
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert rouge_l("", "") == 1.0 and rouge_l("", "x") == 0.0


def test_agreement_metrics():
    result = agreement_metrics(["Paris.", "four"], ["Paris.", "five"])
    assert result["exact_match"] == 0.5
    assert result["rouge_l"] == pytest.approx(0.5)


def test_gap_closed_both_directions():
    fp = {"token_flip_rate": 0.0, "kl": 0.0, "rouge_l": 1.0}
    ptq = {"token_flip_rate": 0.6, "kl": 2.0, "rouge_l": 0.2}
    aligned = {"token_flip_rate": 0.45, "kl": 2.5, "rouge_l": 0.6}
    closed = gap_closed(fp, ptq, aligned)
    assert closed["token_flip_rate"] == pytest.approx(0.25)
    assert closed["kl"] == pytest.approx(-0.25)  # worse than PTQ-only shows as negative
    assert closed["rouge_l"] == pytest.approx(0.5)
    assert gap_closed({"kl": 0.0}, {"kl": 0.0}, {"kl": 0.1})["kl"] is None


def _slow_teacher_forced(model, teacher, held_out, batch_size, pad_id):
    """The plain definition: full logits over every position, then the response positions."""
    from qdpo_core.evaluate import summarize

    totals = {"flips": 0.0, "kl": 0.0, "nll": 0.0, "count": 0.0}
    with torch.no_grad():
        for start in range(0, len(held_out.prompts), batch_size):
            batch = collate(held_out.prompts[start : start + batch_size], held_out.fp_ids[start : start + batch_size], pad_id)
            fp = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            q = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            for key, value in position_stats(fp, q, batch).items():
                totals[key] += value
    return summarize(totals)


def test_fast_teacher_forced_metrics_equal_the_plain_definition(tiny_model_dir, tokenizer):
    from qdpo_core.config import QuantSpec
    from qdpo_core.evaluate import HeldOut, TeacherCache, teacher_forced_metrics
    from qdpo_core.models import load_full_precision
    from qdpo_core.quantize import load_quantized

    teacher = load_full_precision(tiny_model_dir, "cpu")
    student, _ = load_quantized(tiny_model_dir, QuantSpec(method="rtn", bits=2, group_size=32), "cpu")
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 4000, (n,), generator=generator).tolist() for n in (3, 17, 8, 30, 5, 12, 21)]
    answers = [torch.randint(10, 4000, (n,), generator=generator).tolist() for n in (9, 2, 14, 6, 11, 1, 7)]
    held_out = HeldOut(prompts, answers, [""] * len(prompts))
    slow = _slow_teacher_forced(student, teacher, held_out, 3, tokenizer.pad_token_id)
    fast = teacher_forced_metrics(student, teacher, held_out, 3, tokenizer.pad_token_id)
    cache = TeacherCache()
    first = teacher_forced_metrics(student, teacher, held_out, 3, tokenizer.pad_token_id, cache=cache)
    assert cache.batches is not None  # the FP side is kept ...
    again = teacher_forced_metrics(student, teacher, held_out, 3, tokenizer.pad_token_id, cache=cache)  # ... and reused
    assert slow["tokens"] == fast["tokens"] == sum(len(a) for a in answers)
    for result in (fast, first, again):
        for key in ("token_flip_rate", "kl", "perplexity"):
            assert result[key] == pytest.approx(slow[key], rel=1e-5, abs=1e-7), key


def test_sequence_logps_on_the_answer_window_equal_full_logits(tiny_model_dir, tokenizer):
    from qdpo_core.models import load_full_precision
    from qdpo_core.tokens import sequence_logps, token_logps

    model = load_full_precision(tiny_model_dir, "cpu")
    batch = collate([[5, 6, 7, 8, 9], [11, 12]], [[20, 21], [30, 31, 32, 33]], tokenizer.pad_token_id)
    with torch.no_grad():
        full, mask = token_logps(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch)
        sums, lengths = sequence_logps(model, batch)
    assert torch.allclose(sums, full.sum(-1), atol=1e-5) and torch.equal(lengths, mask.sum(-1))
