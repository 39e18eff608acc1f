"""User-supplied preference pairs (plain DPO): TRL or OpenAI preference format, already validated.

Answers longer than dataset.max_response_tokens are cut and counted, never silently; pairs whose two
answers are identical (after tokenization and cutting) are dropped and counted.
"""

from __future__ import annotations

from qdpo_core.pairs.base import PairContext
from qdpo_core.tokens import encode_response


class UserPairs:
    name = "dpo"

    def chunk_size(self, ctx: PairContext) -> int:
        return 256  # tokenization only: chunks just bound the work lost to a crash

    def build_chunk(self, records: list[dict], first_index: int, ctx: PairContext) -> list[dict]:
        prompt_ids = ctx.encode_prompts(records)
        limit = ctx.spec.dataset.max_response_tokens
        examples = []
        for offset, (record, ids) in enumerate(zip(records, prompt_ids)):
            chosen = encode_response(ctx.tokenizer, record["chosen"], limit)
            rejected = encode_response(ctx.tokenizer, record["rejected"], limit)
            ctx.stats["responses_truncated"] += chosen.truncated + rejected.truncated
            example = {
                "index": first_index + offset,
                "messages": record["messages"],
                "prompt_ids": ids,
                "chosen": record["chosen"],
                "chosen_ids": chosen.ids,
                "rejected": record["rejected"],
                "rejected_ids": rejected.ids,
            }
            if "id" in record:
                example["id"] = record["id"]
            if chosen.ids == rejected.ids:
                example["dropped"] = "identical"
            examples.append(example)
        return examples
