"""Distillation targets for the KD baseline: the full-precision model's answer to every prompt.

KD trains the same LoRA to match the FP model's next-token distribution on these answers; the
teacher's distributions are computed on the fly during training, not stored.
"""

from __future__ import annotations

from qdpo_core.pairs.base import PairContext
from qdpo_core.pairs.qdpo import decoding_of


class DistillationTargets:
    name = "kd"

    def chunk_size(self, ctx: PairContext) -> int:
        return ctx.spec.generation.batch_size

    def build_chunk(self, records: list[dict], first_index: int, ctx: PairContext) -> list[dict]:
        prompt_ids = ctx.encode_prompts(records)
        answers = ctx.fp_answer(prompt_ids, decoding_of(ctx), ctx.spec.seed + first_index)
        return [
            {
                "index": first_index + offset,
                "messages": record["messages"],
                "prompt_ids": ids,
                "chosen": fp.text,
                "chosen_ids": fp.ids,
                "chosen_finished": fp.finished,
            }
            for offset, (record, ids, fp) in enumerate(zip(records, prompt_ids, answers))
        ]
