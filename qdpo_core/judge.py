"""Judged win-rate of the aligned model's answers against the PTQ-only model's, on held-out prompts.

    result = judge_answers(labeler, prompts, aligned_texts, ptq_texts)
    result.win_rate, (result.ci_low, result.ci_high)   # e.g. 0.58, (0.41, 0.73)

Each prompt is judged twice, aligned shown first and then second (`labelers.pairwise.compare`).
Following MT-Bench's order-swapped protocol, the aligned answer wins only when both asks prefer it,
loses only when both prefer the PTQ answer, and anything else — disagreeing orders, an exact 0.5,
identical answers — is a tie. Win-rate = (wins + ties / 2) / prompts, with a Wilson score interval,
which stays inside [0, 1] and is honest at the handful of prompts a quick job evaluates.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass

from qdpo_core.labelers.pairwise import compare

Z_95 = 1.959964


def outcome(forward: list[float], swapped: list[float]) -> str:
    """'win' / 'loss' / 'tie' for the first answer, from P over ("1", "2") in both orders."""
    first_in_forward = forward[0] > forward[1]
    first_in_swapped = swapped[1] > swapped[0]
    second_in_forward = forward[1] > forward[0]
    second_in_swapped = swapped[0] > swapped[1]
    if first_in_forward and first_in_swapped:
        return "win"
    if second_in_forward and second_in_swapped:
        return "loss"
    return "tie"


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion (successes may be fractional: a tie counts half)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class JudgeResult:
    wins: int
    losses: int
    ties: int
    prompts: int
    win_rate: float  # (wins + ties / 2) / prompts
    ci_low: float
    ci_high: float
    confidence: float
    mean_preference: float  # mean swap-averaged P(aligned better); 0.5 = indifferent
    labeler: str
    verdicts_from: dict  # {"logprobs": n, "parsed": n, "unparsed": n, "identical": n}: how the verdicts were obtained
    chain_of_thought: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def sentence(self) -> str:
        named = {
            "logprobs": "from log-probs",
            "parsed": "parsed from replies",
            "unparsed": "unreadable (undecided)",
            "identical": "identical answers (tie, not asked)",
        }
        how = ", ".join(f"{v} {named[k]}" for k, v in self.verdicts_from.items() if v)
        return (
            f"Judge ({self.labeler}): aligned won {self.wins}, lost {self.losses}, tied {self.ties} of {self.prompts} held-out prompts "
            f"against PTQ-only; win-rate {self.win_rate:.0%} ({self.confidence:.0%} CI {self.ci_low:.0%}–{self.ci_high:.0%}), "
            f"order-swapped, ties count half; verdicts: {how}."
        )


def judge_answers(
    labeler, prompts: list[list[dict]], candidate: list[str], baseline: list[str], chain_of_thought: bool = False, rationale_tokens: int = 64
) -> tuple[JudgeResult, list[dict]]:
    """Judge `candidate` vs `baseline` answers per prompt → (summary, one row per prompt)."""
    rows: list[dict] = [{"prompt": p[-1]["content"], "candidate": c, "baseline": b} for p, c, b in zip(prompts, candidate, baseline)]
    asked = [k for k, (c, b) in enumerate(zip(candidate, baseline)) if c.strip() != b.strip()]
    comparisons = compare(labeler, [(prompts[k], candidate[k], baseline[k]) for k in asked], chain_of_thought, rationale_tokens)
    sources: Counter = Counter()
    preferences = [0.5] * len(prompts)
    for row in rows:
        row.update(outcome="tie", p_candidate=0.5, identical=True)
    for k, comparison in zip(asked, comparisons):
        sources.update(comparison.sources)
        preferences[k] = comparison.p_first
        rows[k].update(
            outcome=outcome(comparison.forward.probs, comparison.swapped.probs),
            p_candidate=round(comparison.p_first, 6),
            identical=False,
            label=comparison.to_dict(),
        )
    sources["identical"] = len(prompts) - len(asked)
    tally = Counter(row["outcome"] for row in rows)
    n = len(prompts)
    score = tally["win"] + 0.5 * tally["tie"]
    low, high = wilson_interval(score, n)
    result = JudgeResult(
        wins=tally["win"],
        losses=tally["loss"],
        ties=tally["tie"],
        prompts=n,
        win_rate=score / n if n else 0.5,
        ci_low=low,
        ci_high=high,
        confidence=0.95,
        mean_preference=sum(preferences) / n if n else 0.5,
        labeler=labeler.description,
        verdicts_from={k: sources.get(k, 0) for k in ("logprobs", "parsed", "unparsed", "identical")},
        chain_of_thought=chain_of_thought,
    )
    return result, rows


def judge_held_out(spec, models, prompts: list[list[dict]], aligned: list[str], ptq: list[str], rows_path) -> dict:
    """The pipeline's judge step: labeler from `spec` (an eval.judge LabelerSpec), per-prompt verdicts written to rows_path."""
    from qdpo_core.datasets import write_jsonl
    from qdpo_core.labelers import labeler_for

    labeler = labeler_for(spec, models, "eval.judge")
    result, rows = judge_answers(labeler, prompts, aligned, ptq, spec.chain_of_thought, spec.rationale_tokens)
    write_jsonl(rows_path, rows)
    return {**result.to_dict(), "sentence": result.sentence()}
