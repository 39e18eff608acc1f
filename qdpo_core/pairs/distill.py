"""Distillation targets for the KD baseline: the full-precision model's answer to every prompt.

KD trains the same LoRA to match the FP model's next-token distribution on these answers; the
teacher's distributions are computed on the fly during training, not stored. With
`train.kd_sampled_answers` n, each prompt also gets n answers sampled from the FP model
(sequence-level distillation on the teacher's own distribution: more sequences from the same prompts).
"""

from __future__ import annotations

from dataclasses import replace

from qdpo_core.pairs.base import PairContext
from qdpo_core.pairs.qdpo import decoding_of


class DistillationTargets:
    name = "kd"

    def chunk_size(self, ctx: PairContext) -> int:
        return ctx.spec.generation.batch_size

    def build_chunk(self, records: list[dict], first_index: int, ctx: PairContext) -> list[dict]:
        prompt_ids = ctx.encode_prompts(records)
        decoding = decoding_of(ctx)
        answers = [ctx.fp_answer(prompt_ids, decoding, ctx.spec.seed + first_index)]
        sampled = replace(decoding, do_sample=True)
        for sample in range(1, ctx.spec.train.kd_sampled_answers + 1):
            answers.append(ctx.fp_answer(prompt_ids, sampled, ctx.spec.seed + 7919 * sample + first_index))
        return [
            {
                "index": first_index + offset,
                "sample": sample,
                "messages": record["messages"],
                "prompt_ids": ids,
                "chosen": fp.text,
                "chosen_ids": fp.ids,
                "chosen_finished": fp.finished,
            }
            for sample, responses in enumerate(answers)
            for offset, (record, ids, fp) in enumerate(zip(records, prompt_ids, responses))
            if fp.ids or sample == 0  # an empty sampled answer has nothing to distil
        ]
