"""RLAIF pairs: two sampled answers per prompt, the better one (by an AI labeler) chosen.

    spec = PipelineSpec.from_dict({"method": "rlaif", "rlaif": {"min_confidence": 0.1, "labeler": {"chain_of_thought": True}}})
    run_source(RLAIFPairs(), records, PairContext(spec, ...), workdir / "pairs.jsonl")

Per prompt (Lee et al. 2023): sample two answers (the quantized model by default, `rlaif.response_model`);
ask the labeler which is better in both orders and average (`labelers.pairwise.compare`), giving
p = P(first answer better). Pairs with |p − 0.5| < `rlaif.min_confidence` are dropped as
`low_confidence`, identical answers as `identical`. Each kept pair stores `preference`
(P(chosen better)), both verdicts (log-probs, or the parsed text when the endpoint gives none) and
the rationales, so a user can see why an answer won.
"""

from __future__ import annotations

from qdpo_core.generate import Decoding
from qdpo_core.labelers import labeler_for
from qdpo_core.labelers.pairwise import Comparison, compare
from qdpo_core.pairs.base import PairContext


def keep_pair(p_first: float, min_confidence: float) -> bool:
    """A pair is a training signal only when the labeler leans clearly one way (never at exactly 0.5)."""
    # the tolerance keeps a threshold of 0.1 from dropping p = 0.6 over float rounding (|0.6 − 0.5| = 0.0999…)
    return abs(p_first - 0.5) >= min_confidence - 1e-9 and p_first != 0.5


class RLAIFPairs:
    name = "rlaif"

    def __init__(self):
        self._labeler = None  # created on first use, once per stage

    def chunk_size(self, ctx: PairContext) -> int:
        return ctx.spec.generation.batch_size

    def labeler(self, ctx: PairContext):
        if self._labeler is None:
            self._labeler = labeler_for(ctx.spec.rlaif.labeler, ctx.models, "rlaif.labeler")
        return self._labeler

    def build_chunk(self, records: list[dict], first_index: int, ctx: PairContext) -> list[dict]:
        rlaif, generation = ctx.spec.rlaif, ctx.spec.generation
        prompt_ids = ctx.encode_prompts(records)
        responder = (
            (ctx.models.policy or ctx.models.student) if rlaif.response_model == "quantized" else ctx.models.teacher
        )  # quantized: the model being repaired
        decoding = Decoding(max_new_tokens=generation.max_new_tokens, do_sample=True, temperature=rlaif.temperature, top_p=generation.top_p)
        # both answers of every prompt in one batch: rows [0, n) are the first samples, [n, 2n) the second
        answers = ctx.answer(responder, prompt_ids + prompt_ids, decoding, ctx.spec.seed + first_index)
        n = len(records)
        examples, to_label = [], []
        for offset, (record, ids) in enumerate(zip(records, prompt_ids)):
            a, b = answers[offset], answers[n + offset]
            example = {"index": first_index + offset, "messages": record["messages"], "prompt_ids": ids, "responses": [a.text, b.text]}
            if a.ids == b.ids:
                example["dropped"] = "identical"
            else:
                to_label.append((example, a, b))
            examples.append(example)
        settings = rlaif.labeler
        comparisons = compare(
            self.labeler(ctx), [(e["messages"], a.text, b.text) for e, a, b in to_label], settings.chain_of_thought, settings.rationale_tokens
        )
        for (example, a, b), comparison in zip(to_label, comparisons):
            self._label(example, a, b, comparison, rlaif.min_confidence, ctx)
        return examples

    @staticmethod
    def _label(example: dict, a, b, comparison: Comparison, min_confidence: float, ctx: PairContext) -> None:
        for source in comparison.sources:
            ctx.stats[f"labels_{source}"] += 1  # labels_logprobs / labels_parsed / labels_unparsed
        a_wins = comparison.p_first > 0.5
        chosen, rejected = (a, b) if a_wins else (b, a)
        example.update(
            chosen=chosen.text,
            chosen_ids=chosen.ids,
            rejected=rejected.text,
            rejected_ids=rejected.ids,
            chosen_finished=chosen.finished,
            rejected_finished=rejected.finished,
            preference=round(comparison.p_first if a_wins else 1 - comparison.p_first, 6),
            label=comparison.to_dict(),  # about responses[0] vs responses[1], in that order
        )
        if not keep_pair(comparison.p_first, min_confidence):
            example["dropped"] = "low_confidence"
