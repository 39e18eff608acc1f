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

from qdpo_core.tokens import SequenceBatch, collate, response_logits, scored_width, shifted

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
        """Batches of similar lengths (little padding); the metrics are sums, so order does not matter."""
        order = sorted(range(len(self.prompts)), key=lambda i: (len(self.prompts[i]), len(self.fp_ids[i])))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            yield collate([self.prompts[i] for i in chunk], [self.fp_ids[i] for i in chunk], pad_id)


def position_stats(fp_logits: torch.Tensor, q_logits: torch.Tensor, batch: SequenceBatch) -> dict[str, float]:
    """Sums over response positions of one batch: flips, KL, NLL of the targets, and the count.

    fp_logits, q_logits: (B, T, V) over the same sequences.
    """
    fp_step, targets, mask = shifted(fp_logits, batch)
    keep = mask.bool()
    return scored_stats(torch.log_softmax(fp_step[keep].float(), dim=-1), q_logits[:, :-1, :][keep], targets[keep])


def scored_stats(fp_logp: torch.Tensor, q_logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """The sums over scored positions only: fp_logp (N, V) FP log-probs, q_logits (N, V), targets (N,)."""
    q_logp = torch.log_softmax(q_logits.float(), dim=-1)  # (N, V)
    flips = fp_logp.argmax(-1) != q_logp.argmax(-1)  # argmax of log-softmax = argmax of the logits
    kl = (fp_logp.exp() * (fp_logp - q_logp)).sum(-1)  # (N,)
    nll = -q_logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N,)
    return {"flips": float(flips.sum()), "kl": float(kl.sum()), "nll": float(nll.sum()), "count": float(targets.numel())}


def summarize(stats: dict[str, float]) -> dict[str, float]:
    count = max(stats["count"], 1.0)
    return {
        "token_flip_rate": stats["flips"] / count,
        "kl": max(stats["kl"] / count, 0.0),  # float noise can make a zero KL slightly negative
        "perplexity": math.exp(stats["nll"] / count),
        "tokens": int(stats["count"]),
    }


class TeacherCache:
    """The FP model's log-probs at the scored positions of each held-out batch, computed once.

    A run scores the same held-out answers at every checkpoint; the teacher's side never changes.
    Kept in memory up to `max_bytes` (beyond that the teacher is run again each time).
    """

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self.batches: list[torch.Tensor] | None = None

    def fits(self, held_out: HeldOut, vocab_size: int) -> bool:
        return sum(len(a) for a in held_out.fp_ids) * vocab_size * 4 <= self.max_bytes


@torch.inference_mode()
def teacher_forced_metrics(model, teacher, held_out: HeldOut, batch_size: int, pad_id: int, cache: TeacherCache | None = None) -> dict[str, float]:
    """Token-flip rate, KL(FP‖model) and perplexity of FP answers under `model`.

    Only the positions that predict answer tokens go through the LM head and the softmax; the FP
    side comes from `cache` when one is given (filled on first use).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = {"flips": 0.0, "kl": 0.0, "nll": 0.0, "count": 0.0}
    cached = cache.batches if cache is not None else None
    fresh: list[torch.Tensor] | None = [] if cache is not None and cached is None else None
    for number, batch in enumerate(held_out.batches(batch_size, pad_id)):
        batch = batch.to(device)
        keep = scored_width(batch)
        q_logits, targets, mask = response_logits(model, batch, keep)
        selected = mask.bool()
        if cached is not None:
            fp_logp = cached[number]
        else:
            fp_logits, _, _ = response_logits(teacher, batch, keep)
            fp_logp = torch.log_softmax(fp_logits[selected].float(), dim=-1)  # (N, V)
            if fresh is not None and cache is not None:
                fresh = fresh + [fp_logp] if cache.fits(held_out, fp_logp.shape[-1]) else None
        for key, value in scored_stats(fp_logp, q_logits[selected], targets[selected]).items():
            totals[key] += value
    if fresh and cache is not None:
        cache.batches = fresh
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
