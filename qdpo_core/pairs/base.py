"""The interface every pair source implements, and the resumable chunk runner they share.

A pair source turns training records (`{"messages": [...]}` prompts, or supplied pairs) into
training examples `{"messages", "prompt_ids", "chosen", "chosen_ids", "rejected", "rejected_ids", ...}`
(`rejected*` absent for distillation targets). It works chunk by chunk; after every chunk its output
is appended to `pairs.partial.jsonl` with a completion marker, so a crash or cancel loses at most the
chunk in flight and a rerun continues where it stopped.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from qdpo_core.config import PipelineSpec
from qdpo_core.errors import Cancelled
from qdpo_core.events import Emitter
from qdpo_core.generate import Decoding, Response, generate
from qdpo_core.tokens import encode_prompt

CHUNK_MARKER = "_chunk_done"


@dataclass
class PairContext:
    spec: PipelineSpec
    tokenizer: Any
    models: Any  # holder.ModelHolder: .teacher and .student load on first use
    emitter: Emitter
    workdir: Path
    should_cancel: Callable[[], bool] = lambda: False
    stats: Counter = field(default_factory=Counter)
    fp_cache: dict | None = None  # prompt ids -> the FP model's greedy answer, filled on first use

    def encode_prompts(self, records: list[dict]) -> list[list[int]]:
        limit = self.spec.dataset.max_prompt_tokens
        encoded = [encode_prompt(self.tokenizer, r["messages"], limit) for r in records]
        self.stats["prompts_truncated"] += sum(e.truncated for e in encoded)
        return [e.ids for e in encoded]

    def answer(self, model, prompt_ids: list[list[int]], decoding: Decoding, seed: int) -> list[Response]:
        responses = generate(model, self.tokenizer, prompt_ids, decoding, seed=seed)
        self._count(responses)
        return responses

    def _count(self, responses: list[Response]) -> None:
        self.stats["responses_cut"] += sum(not r.finished for r in responses)
        self.stats["responses_generated"] += len(responses)

    def fp_answer(self, prompt_ids: list[list[int]], decoding: Decoding, seed: int) -> list[Response]:
        """The FP model's answers; greedy ones already generated for calibration (init/fp_answers.jsonl) are reused."""
        if self.fp_cache is None:
            self.fp_cache = {}
            path = self.workdir / "init" / "fp_answers.jsonl"
            if not decoding.do_sample and decoding.max_new_tokens == self.spec.generation.max_new_tokens and path.is_file():
                for line in path.read_text(encoding="utf-8").splitlines():
                    row = json.loads(line)
                    self.fp_cache[tuple(row["prompt_ids"])] = Response(row["ids"], row["text"], row["finished"])
        if decoding.do_sample or not self.fp_cache:
            return self.answer(self.models.teacher, prompt_ids, decoding, seed)
        missing = [p for p in prompt_ids if tuple(p) not in self.fp_cache]
        if missing:
            for p, response in zip(missing, generate(self.models.teacher, self.tokenizer, missing, decoding, seed=seed)):
                self.fp_cache[tuple(p)] = response
        responses = [self.fp_cache[tuple(p)] for p in prompt_ids]
        self._count(responses)
        self.stats["fp_answers_reused"] += len(prompt_ids) - len(missing)
        return responses


class PairSource(Protocol):
    name: str

    def chunk_size(self, ctx: PairContext) -> int: ...

    def build_chunk(self, records: list[dict], first_index: int, ctx: PairContext) -> list[dict]:
        """Examples for `records` (whose first has index `first_index`); dropped ones carry "dropped": reason."""
        ...


def run_source(source: PairSource, records: list[dict], ctx: PairContext, out_path: Path, all_path: Path | None = None) -> dict:
    """Run `source` over all records, resuming from `<out>.partial.jsonl`; write kept examples to out_path.

    With `all_path`, every example is also written there, dropped ones included (method auto
    distils on the FP answers of every prompt, including those whose QDPO pair was identical).
    """
    partial = out_path.with_suffix(".partial.jsonl")
    done_examples, done_count, done_stats = _read_partial(partial)
    ctx.stats.update(done_stats)  # counts (truncations, cut answers) of the chunks already done
    size = max(1, source.chunk_size(ctx))
    total_chunks = -(-len(records) // size)
    if done_count:
        ctx.emitter.log(f"resuming pair building after {done_count} of {len(records)} prompts")
    with partial.open("a", encoding="utf-8") as handle:
        for number, start in enumerate(range(0, len(records), size), start=1):
            if start < done_count:
                continue
            if ctx.should_cancel():
                raise Cancelled("cancelled while building pairs; finished chunks are kept")
            examples = source.build_chunk(records[start : start + size], start, ctx)
            lines = [json.dumps(e, ensure_ascii=False) for e in examples]
            lines.append(json.dumps({CHUNK_MARKER: start + len(records[start : start + size]), "stats": dict(ctx.stats)}))
            handle.write("\n".join(lines) + "\n")  # one write per chunk; the marker makes it count
            handle.flush()
            done_examples.extend(examples)
            ctx.emitter.progress(number, total_chunks, f"pairs: {min(start + size, len(records))}/{len(records)} prompts")
    kept = [e for e in done_examples if not e.get("dropped")]
    dropped = Counter(e["dropped"] for e in done_examples if e.get("dropped"))
    tmp = out_path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for example in kept:
            handle.write(json.dumps(example, ensure_ascii=False) + "\n")
    tmp.replace(out_path)
    if all_path is not None:
        tmp = all_path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            for example in done_examples:
                handle.write(json.dumps({k: v for k, v in example.items() if k != "dropped"}, ensure_ascii=False) + "\n")
        tmp.replace(all_path)
    summary = {"source": source.name, "prompts": len(records), "examples": len(kept), **{f"dropped_{k}": v for k, v in dropped.items()}}
    summary.update({k: v for k, v in ctx.stats.items() if v})
    return summary


def _read_partial(path: Path) -> tuple[list[dict], int, dict]:
    """Examples of the chunks that completed, how many records they covered, and their counts."""
    if not path.exists():
        return [], 0, {}
    completed: list[dict] = []
    pending: list[dict] = []
    covered, stats = 0, {}
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line from a crash: that chunk is redone
            if CHUNK_MARKER in item:
                completed.extend(pending)
                pending = []
                covered, stats = item[CHUNK_MARKER], item.get("stats", {})
            else:
                pending.append(item)
    # Rewrite without the torn tail so appends continue from a clean state.
    with path.open("w", encoding="utf-8") as handle:
        for example in completed:
            handle.write(json.dumps(example, ensure_ascii=False) + "\n")
        if covered:
            handle.write(json.dumps({CHUNK_MARKER: covered, "stats": stats}) + "\n")
    return completed, covered, stats
