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
