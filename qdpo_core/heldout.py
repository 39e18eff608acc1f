"""Held-out evaluation of one run: the FP answers (generated once), and every model scored against them.

baseline/fp_responses.jsonl    held-out prompts with the FP model's greedy answers (ids and text)
<answers_path>                 a scored model's own greedy answers (cached: scoring again reuses them)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from qdpo_core.config import PipelineSpec
from qdpo_core.datasets import load_jsonl, write_jsonl
from qdpo_core.events import Emitter
from qdpo_core.holder import ModelHolder


class HeldOutEvaluator:
    def __init__(self, spec: PipelineSpec, workdir: Path, models: ModelHolder, cancel_check: Callable[[], None]):
        from qdpo_core.evaluate import TeacherCache

        self.spec, self.workdir, self.models, self.cancel_check = spec, workdir, models, cancel_check
        self.teacher_cache = TeacherCache()  # the FP side of every held-out score, computed once per run

    @property
    def fp_path(self) -> Path:
        return self.workdir / "baseline" / "fp_responses.jsonl"

    def held_out(self, emitter: Emitter | None = None):
        """(HeldOut, rows): held-out prompts with FP answers (generated once, then read back)."""
        from qdpo_core.evaluate import HeldOut
        from qdpo_core.tokens import encode_prompt

        if not self.fp_path.is_file():
            records = load_jsonl(self.workdir / "data" / "eval.jsonl")
            prompts = [encode_prompt(self.models.tokenizer, r["messages"], self.spec.dataset.max_prompt_tokens).ids for r in records]
            answers = self.answers(self.models.teacher, prompts, "FP answers", emitter)
            self.fp_path.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(
                self.fp_path,
                [
                    {"messages": r["messages"], "prompt_ids": p, "ids": a.ids, "text": a.text, "finished": a.finished}
                    for r, p, a in zip(records, prompts, answers)
                ],
            )
        rows = load_jsonl(self.fp_path)
        return HeldOut([r["prompt_ids"] for r in rows], [r["ids"] for r in rows], [r["text"] for r in rows]), rows

    def answers(self, model, prompts: list[list[int]], label: str, emitter: Emitter | None):
        """Greedy answers of `model` with the evaluation's decoding settings."""
        from qdpo_core.generate import Decoding, generate_all

        def tick(number: int, total: int) -> None:
            if emitter:
                emitter.progress(number, total, f"{label}: batch {number}/{total}")
            self.cancel_check()

        decoding = Decoding(max_new_tokens=self.spec.eval.max_new_tokens)
        return generate_all(model, self.models.tokenizer, prompts, decoding, self.spec.generation.batch_size, on_batch=tick)

    def teacher_forced(self, model) -> dict:
        """Token-flip rate, KL and perplexity of `model` on the FP answers (no generation)."""
        from qdpo_core.evaluate import teacher_forced_metrics

        held_out, _ = self.held_out()
        return teacher_forced_metrics(
            model, self.models.teacher, held_out, self.spec.eval.batch_size, self.models.tokenizer.pad_token_id, cache=self.teacher_cache
        )

    def score(self, model, answers_path: Path, label: str, emitter: Emitter) -> dict:
        """All held-out metrics of `model` (its greedy answers cached at answers_path)."""
        from qdpo_core.evaluate import agreement_metrics

        held_out, rows = self.held_out(emitter)
        if model is self.models.teacher:  # the FP answers are the reference itself
            write_jsonl(answers_path, [{"text": r["text"], "finished": r["finished"]} for r in rows])
        if not answers_path.is_file():
            answers = self.answers(model, held_out.prompts, label, emitter)
            answers_path.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(answers_path, [{"text": a.text, "finished": a.finished} for a in answers])
        texts = [r["text"] for r in load_jsonl(answers_path)]
        metrics = self.teacher_forced(model)
        metrics.update(agreement_metrics(held_out.fp_texts, texts, self._embedder()))
        return metrics

    def _embedder(self):
        if not self.spec.eval.semantic_similarity:
            return None
        from qdpo_core.semantic import embed

        return embed
