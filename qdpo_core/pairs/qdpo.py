"""QDPO pairs: the full-precision model's answer is chosen, the quantized model's answer rejected.

No human labels: the pair marks exactly where quantization made the model drift. A pair whose two
answers are identical carries no signal and is dropped (and counted). The rejected side is the
model being repaired (`generation.rejected_model: init`, the default: the quantized base with the
initialised adapter, which flips at other places than PTQ-only), or PTQ-only as in the paper
(`ptq`). Measured on SmolLM2-135M at RTN 3-bit: init rejections improved held-out KL over the init,
PTQ rejections did not.
"""

from __future__ import annotations

from qdpo_core.generate import Decoding
from qdpo_core.pairs.base import PairContext


def decoding_of(ctx: PairContext) -> Decoding:
    g = ctx.spec.generation
    return Decoding(max_new_tokens=g.max_new_tokens, do_sample=g.do_sample, temperature=g.temperature, top_p=g.top_p)


def rejected_answers(ctx: PairContext, prompt_ids: list[list[int]], decoding: Decoding, seed: int):
    """Answers of the rejected side: the model being repaired, or PTQ-only.

    Once the init stage has wrapped the quantized model with LoRA layers, that model *is* the policy
    (PEFT injects the layers in place), so PTQ-only answers need the adapter switched off.
    """
    policy = ctx.models.policy
    if policy is None:
        return ctx.answer(ctx.models.student, prompt_ids, decoding, seed)
    if ctx.spec.generation.rejected_model == "init":
        return ctx.answer(policy, prompt_ids, decoding, seed)
    with policy.disable_adapter():
        return ctx.answer(policy, prompt_ids, decoding, seed)


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
            q_answers = rejected_answers(ctx, prompt_ids, decoding, seed)
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
