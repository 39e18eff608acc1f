"""Held-out metrics of a quantized model against the full-precision (FP) teacher.

Teacher-forced on the FP model's own greedy answers (one forward pass each, no generation):
  token_flip_rate  share of response positions where argmax(quantized) ≠ argmax(FP)
  kl               mean KL(p_FP ‖ p_quantized) per response token, in nats
  perplexity       exp(mean NLL of the FP answer tokens under the quantized model)
From the model's own greedy answers, compared with the FP ones:
  exact_match      share of answers identical to FP's (whitespace-trimmed)
  rouge_l          mean ROUGE-L F1 over lower-cased words
  cosine           mean embedding cosine (all-MiniLM-L6-v2), when asked for
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from qdpo_core.tokens import SequenceBatch, collate, shifted

TEACHER_FORCED = ("token_flip_rate", "kl", "perplexity")
AGREEMENT = ("exact_match", "rouge_l", "cosine")
HIGHER_IS_BETTER = {"exact_match", "rouge_l", "cosine"}


@dataclass
class HeldOut:
    """Held-out prompts with the FP model's greedy answers (token ids and text)."""

    prompts: list[list[int]]
    fp_ids: list[list[int]]
    fp_texts: list[str]

    def batches(self, batch_size: int, pad_id: int):
        for start in range(0, len(self.prompts), batch_size):
            yield collate(self.prompts[start : start + batch_size], self.fp_ids[start : start + batch_size], pad_id)


def position_stats(fp_logits: torch.Tensor, q_logits: torch.Tensor, batch: SequenceBatch) -> dict[str, float]:
    """Sums over response positions of one batch: flips, KL, NLL of the targets, and the count.

    fp_logits, q_logits: (B, T, V) over the same sequences.
    """
    fp_step, targets, mask = shifted(fp_logits, batch)
    q_step = q_logits[:, :-1, :]
    fp_logp = torch.log_softmax(fp_step.float(), dim=-1)  # (B, T-1, V)
    q_logp = torch.log_softmax(q_step.float(), dim=-1)
    flips = (fp_step.argmax(-1) != q_step.argmax(-1)).to(mask.dtype)  # (B, T-1)
    kl = (fp_logp.exp() * (fp_logp - q_logp)).sum(-1)  # (B, T-1)
    nll = -q_logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return {
        "flips": float((flips * mask).sum()),
        "kl": float((kl * mask).sum()),
        "nll": float((nll * mask).sum()),
        "count": float(mask.sum()),
    }


def summarize(stats: dict[str, float]) -> dict[str, float]:
    count = max(stats["count"], 1.0)
    return {
        "token_flip_rate": stats["flips"] / count,
        "kl": max(stats["kl"] / count, 0.0),  # float noise can make a zero KL slightly negative
        "perplexity": math.exp(stats["nll"] / count),
        "tokens": int(stats["count"]),
    }


@torch.no_grad()
def teacher_forced_metrics(model, teacher, held_out: HeldOut, batch_size: int, pad_id: int) -> dict[str, float]:
    """Token-flip rate, KL(FP‖model) and perplexity of FP answers under `model`."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = {"flips": 0.0, "kl": 0.0, "nll": 0.0, "count": 0.0}
    for batch in held_out.batches(batch_size, pad_id):
        batch = batch.to(device)
        fp_logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        q_logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        for key, value in position_stats(fp_logits, q_logits, batch).items():
            totals[key] += value
    model.train(was_training)
    return summarize(totals)


_WORD = re.compile(r"\w+", re.UNICODE)


def rouge_l(reference: str, candidate: str) -> float:
    """ROUGE-L F1 on lower-cased words (longest common subsequence)."""
    ref, cand = _WORD.findall(reference.lower()), _WORD.findall(candidate.lower())
    if not ref or not cand:
        return float(ref == cand)
    previous = [0] * (len(cand) + 1)
    for r in ref:
        current = [0]
        for j, c in enumerate(cand, start=1):
            current.append(previous[j - 1] + 1 if r == c else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def agreement_metrics(fp_texts: list[str], texts: list[str], embed=None) -> dict[str, float]:
    """Exact match and ROUGE-L of answers vs the FP answers (and cosine when an embedder is given)."""
    pairs = list(zip(fp_texts, texts))
    result = {
        "exact_match": sum(a.strip() == b.strip() for a, b in pairs) / max(len(pairs), 1),
        "rouge_l": sum(rouge_l(a, b) for a, b in pairs) / max(len(pairs), 1),
    }
    if embed is not None:
        result["cosine"] = float(torch.nn.functional.cosine_similarity(embed(fp_texts), embed(texts), dim=-1).mean())
    return result


def gap_closed(fp: dict, ptq: dict, aligned: dict) -> dict[str, float | None]:
    """Share of the PTQ→FP gap the aligned model closed, per metric: (ptq − aligned) / (ptq − fp).

    1.0 = aligned matches FP, 0 = no better than PTQ-only, negative = worse. None when PTQ already
    equals FP on that metric (nothing to close).
    """
    closed = {}
    for key in TEACHER_FORCED + AGREEMENT:
        if key in fp and key in ptq and key in aligned:
            gap = ptq[key] - fp[key]
            closed[key] = None if abs(gap) < 1e-9 else (ptq[key] - aligned[key]) / gap
    return closed
