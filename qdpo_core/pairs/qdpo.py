"""QDPO pairs: the full-precision model's answer is chosen, the quantized model's answer rejected.

No human labels: the pair marks exactly where quantization made the model drift. A pair whose two
answers are identical carries no signal and is dropped (and counted). The rejected side is the
PTQ-only model, or with `generation.rejected_model: init` the model being repaired (the quantized
base with the initialised adapter), which flips at other places than PTQ-only.
"""

from __future__ import annotations

from qdpo_core.generate import Decoding
from qdpo_core.pairs.base import PairContext


def decoding_of(ctx: PairContext) -> Decoding:
    g = ctx.spec.generation
    return Decoding(max_new_tokens=g.max_new_tokens, do_sample=g.do_sample, temperature=g.temperature, top_p=g.top_p)


def rejecting_model(ctx: PairContext):
    """The model whose answers are rejected: PTQ-only, or the quantized model with the initialised adapter."""
    if ctx.spec.generation.rejected_model == "init" and ctx.models.policy is not None:
        return ctx.models.policy
    return ctx.models.student


class QdpoPairs:
    name = "qdpo"

    def chunk_size(self, ctx: PairContext) -> int:
        return ctx.spec.generation.batch_size

    def build_chunk(self, records: list[dict], first_index: int, ctx: PairContext) -> list[dict]:
        prompt_ids = ctx.encode_prompts(records)
        decoding = decoding_of(ctx)
        examples = []
        for sample in range(ctx.spec.generation.num_samples):
            seed = ctx.spec.seed + 7919 * sample + first_index  # distinct, reproducible per chunk and sample
            fp_answers = ctx.fp_answer(prompt_ids, decoding, seed)
            q_answers = ctx.answer(rejecting_model(ctx), prompt_ids, decoding, seed)
            for offset, (record, ids, fp, q) in enumerate(zip(records, prompt_ids, fp_answers, q_answers)):
                example = {
                    "index": first_index + offset,
                    "sample": sample,
                    "messages": record["messages"],
                    "prompt_ids": ids,
                    "chosen": fp.text,
                    "chosen_ids": fp.ids,
                    "rejected": q.text,
                    "rejected_ids": q.ids,
                    "chosen_finished": fp.finished,
                    "rejected_finished": q.finished,
                }
                if fp.ids == q.ids:
                    example["dropped"] = "identical"
                examples.append(example)
        return examples
