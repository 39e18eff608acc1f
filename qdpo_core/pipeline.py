"""run_pipeline: prepare → quantize → pairs → baseline → train → evaluate → export, resumable per stage.

    from qdpo_core.config import PipelineSpec
    from qdpo_core.pipeline import run_pipeline
    result = run_pipeline(PipelineSpec.from_dict({"method": "qdpo"}), "runs/demo", on_event=print)
    result.export_dir  # adapter/ + manifest.json + report.json + report.md

Work directory layout (every file is written atomically; a stage whose marker exists is skipped):

    spec.json                      the spec this directory belongs to (a different spec is refused)
    stages/<stage>.json            completion marker + stage summary (counts, timings)
    data/train.jsonl, data/eval.jsonl      normalised prompts / pairs after the split
    pairs.jsonl                    training examples: messages, chosen, rejected (+ token ids)
    baseline/                      FP and PTQ-only greedy answers on held-out prompts
    train/reference_logps.json     frozen-reference log-probs, computed once
    train/checkpoints/step-N/      adapter + optimizer + RNG + trainer_state.json (resume point)
    train/best/                    best adapter by held-out metric (or the identity adapter)
    evaluate/                      the aligned model's answers
    export/                        adapter/ manifest.json report.json report.md
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qdpo_core.config import PipelineSpec
from qdpo_core.datasets import load_jsonl
from qdpo_core.errors import Cancelled, SpecError
from qdpo_core.events import STAGES, Emitter, EventCallback
from qdpo_core.heldout import HeldOutEvaluator
from qdpo_core.holder import ModelHolder
from qdpo_core.workdir import WorkDir

__all__ = ["ModelHolder", "PipelineResult", "run_pipeline"]


@dataclass
class PipelineResult:
    export_dir: Path
    report: dict
    manifest: dict


class Run:
    """One pipeline run over a work directory; each stage method returns its JSON summary."""

    def __init__(self, spec: PipelineSpec, workdir: Path, on_event: EventCallback | None, should_cancel: Callable[[], bool] | None):
        self.spec, self.workdir = spec, workdir
        self.emitter = Emitter(on_event)
        self.should_cancel = should_cancel or (lambda: False)
        self.models = ModelHolder(spec)
        self.dir = WorkDir(workdir)
        self.evaluator = HeldOutEvaluator(spec, workdir, self.models, self.cancel_check)

    # ---- bookkeeping --------------------------------------------------------------------
    def done(self, stage: str) -> dict | None:
        return self.dir.done(stage)

    def run_stage(self, stage: str, body: Callable[[Emitter], dict]) -> dict:
        previous = self.done(stage)
        if previous is not None:
            return previous
        if self.should_cancel():
            raise Cancelled(f"cancelled before stage {stage}; finished stages are kept")
        emitter = self.emitter.for_stage(stage)
        emitter.emit("stage", "started")
        started = time.monotonic()
        summary = body(emitter)
        summary["seconds"] = round(time.monotonic() - started, 2)
        self.dir.finish(stage, summary)
        emitter.emit("stage", "finished", **{k: v for k, v in summary.items() if not isinstance(v, (list, dict))})
        return summary

    def cancel_check(self) -> None:
        if self.should_cancel():
            raise Cancelled("cancelled; finished work is kept")

    # ---- stages -------------------------------------------------------------------------
    def prepare(self, emitter: Emitter) -> dict:
        from qdpo_core.models import resolve_model_dir
        from qdpo_core.prepare import prepare_data, write_prepared

        train, held_out, summary = prepare_data(self.spec)
        # Unknown or unreachable models (the base, and any local labeler or judge) fail here, before heavy work.
        resolve_model_dir(self.spec.model.name)
        for labeler in self.local_labelers():
            resolve_model_dir(labeler.model)
        write_prepared(self.workdir, train, held_out)
        emitter.log(f"{summary['train_records']} training records and {summary['eval_prompts']} held-out prompts from the {summary['source']}")
        return summary

    def local_labelers(self) -> list:
        spec = self.spec
        labelers = [spec.eval.judge] if spec.eval.judge else []
        if spec.method in ("rlaif", "factuality"):
            labelers.append(getattr(spec, spec.method).labeler)
        return [labeler for labeler in labelers if labeler.kind == "local"]

    def quantize(self, emitter: Emitter) -> dict:
        fp_bytes = self.models.teacher.get_memory_footprint()
        info = self.models.quant_info.to_dict()
        emitter.log(
            f"quantized {info['quantized_layers']} layers: {info['packed_bytes'] / 1e6:.1f} MB at {info['bits']} bits vs {fp_bytes / 1e6:.1f} MB full precision"
        )
        return {**info, "fp_memory_bytes": fp_bytes, "device": self.models.device}

    def pairs(self, emitter: Emitter) -> dict:
        from qdpo_core.pairs import source_for
        from qdpo_core.pairs.base import PairContext, run_source

        records = load_jsonl(self.workdir / "data" / "train.jsonl")
        ctx = PairContext(self.spec, self.models.tokenizer, self.models, emitter, self.workdir, self.should_cancel)
        summary = run_source(source_for(self.spec.method), records, ctx, self.workdir / "pairs.jsonl")
        for key, what in (
            ("prompts_truncated", f"prompts were longer than dataset.max_prompt_tokens={self.spec.dataset.max_prompt_tokens} and lost their beginning"),
            ("responses_truncated", f"supplied answers were longer than dataset.max_response_tokens={self.spec.dataset.max_response_tokens} and were cut"),
            ("responses_cut", f"generated answers hit generation.max_new_tokens={self.spec.generation.max_new_tokens} before finishing"),
        ):
            if summary.get(key):
                emitter.warn(f"{summary[key]} {what}", count=summary[key])
        dropped = summary.get("dropped_identical", 0)
        emitter.log(f"{summary['examples']} training examples from {summary['prompts']} prompts" + (f"; {dropped} identical pairs dropped" if dropped else ""))
        if summary.get("labels_parsed") or summary.get("labels_unparsed"):
            # the endpoint gave no log-probs: labels are hard verdicts read from its replies, not soft preferences
            note = f"the labeler returned no log-probabilities, so {summary.get('labels_parsed', 0)} labels are verdicts parsed from its replies"
            if summary.get("labels_unparsed"):
                note += f" ({summary['labels_unparsed']} replies named no answer and count as undecided)"
            summary["notes"] = summary.get("notes", []) + [note]
            emitter.warn(note)
        if summary["examples"] == 0:
            reasons = ", ".join(f"{v} {k[len('dropped_') :].replace('_', ' ')}" for k, v in summary.items() if k.startswith("dropped_")) or "none built"
            raise SpecError(
                f"dataset: every pair was dropped ({reasons}), so there is nothing to train on; "
                "use more prompts, generation.do_sample with num_samples > 1, a lower bit width, "
                "or for rlaif / factuality a lower rlaif.min_confidence / factuality.min_score_gap",
                param="dataset",
            )
        return summary

    def baseline(self, emitter: Emitter) -> dict:
        fp = self.evaluator.score(self.models.teacher, self.workdir / "baseline" / "fp_self.jsonl", "FP answers", emitter)
        ptq = self.evaluator.score(self.models.student, self.workdir / "baseline" / "ptq_responses.jsonl", "PTQ-only answers", emitter)
        emitter.log(f"PTQ-only: token-flip rate {ptq['token_flip_rate']:.1%}, KL {ptq['kl']:.4f} nats/token", fp=fp, ptq=ptq)
        return {"fp": fp, "ptq": ptq}

    def train(self, emitter: Emitter) -> dict:
        from qdpo_core.train import Trainer, make_policy

        baseline = self.done("baseline")
        examples = load_jsonl(self.workdir / "pairs.jsonl")
        policy = self.models.policy = make_policy(self.models.student, self.spec.train, self.spec.seed)

        trainer = Trainer(
            policy,
            self.models.teacher,
            self.models.tokenizer,
            examples,
            self.spec.train,
            "kd" if self.spec.method == "kd" else "dpo",
            self.workdir / "train",
            self.evaluator.teacher_forced,
            {k: baseline["ptq"][k] for k in ("token_flip_rate", "kl", "perplexity")},
            emitter,
            self.should_cancel,
            self.spec.seed,
        )
        result = trainer.run()
        if result.best_step == 0:
            emitter.warn("no checkpoint beat the PTQ-only model on held-out data; the export is the identity adapter")
        return {**result.to_dict(), "best_dir": str(result.best_dir.relative_to(self.workdir))}

    def evaluate(self, emitter: Emitter) -> dict:
        from qdpo_core.report import build_report

        trained = self.done("train")
        aligned_model = self._aligned_policy(self.workdir / trained["best_dir"])
        aligned = self.evaluator.score(aligned_model, self.workdir / "evaluate" / "aligned_responses.jsonl", "aligned answers", emitter)
        baseline = self.done("baseline")
        _, rows = self.evaluator.held_out()
        ptq_texts = [r["text"] for r in load_jsonl(self.workdir / "baseline" / "ptq_responses.jsonl")]
        aligned_texts = [r["text"] for r in load_jsonl(self.workdir / "evaluate" / "aligned_responses.jsonl")]
        samples = [
            {"prompt": row["messages"][-1]["content"], "fp": row["text"], "ptq": ptq, "aligned": al}
            for row, ptq, al in list(zip(rows, ptq_texts, aligned_texts))[:3]
        ]
        from qdpo_core.export import quantization_label

        judge = None
        if self.spec.eval.judge is not None:
            from qdpo_core.judge import judge_held_out

            judge = judge_held_out(
                self.spec.eval.judge, self.models, [r["messages"] for r in rows], aligned_texts, ptq_texts, self.workdir / "evaluate" / "judge_verdicts.jsonl"
            )
            aligned["judge_win_rate"] = judge["win_rate"]
            emitter.log(judge["sentence"], judge=judge)
        report = build_report(
            baseline["fp"],
            baseline["ptq"],
            aligned,
            method=self.spec.method,
            model=self.spec.model.name,
            quantization=self.spec.quantization.to_dict(),
            quantization_label=quantization_label(self.spec.quantization),
            eval_prompts=len(rows),
            selected_checkpoint=trained["best_step"],
            stopped_early=trained["stopped_early"],
            training_steps=trained["steps"],
            checkpoints=trained["checkpoint_evals"],
            pairs={k: v for k, v in (self.done("pairs") or {}).items() if k != "seconds"},
            memory={k: (self.done("quantize") or {}).get(k) for k in ("fp_memory_bytes", "memory_bytes", "packed_bytes")},
            samples=samples,
            **({"judge": judge} if judge is not None else {}),
        )
        path = self.workdir / "evaluate" / "report.json"
        path.write_text(json.dumps(report, indent=2, ensure_ascii=False))
        emitter.log(report["verdict"])
        return {"report": str(path.relative_to(self.workdir))}

    def _aligned_policy(self, best_dir: Path):
        """The quantized model with the selected adapter, whether or not training ran in this process."""
        from peft import PeftModel, set_peft_model_state_dict
        from safetensors.torch import load_file

        if self.models.policy is not None:
            set_peft_model_state_dict(self.models.policy, load_file(best_dir / "adapter_model.safetensors"))
            return self.models.policy
        self.models.policy = PeftModel.from_pretrained(self.models.student, best_dir)
        return self.models.policy

    def export(self, emitter: Emitter) -> dict:
        from qdpo_core.export import export

        report = json.loads((self.workdir / "evaluate" / "report.json").read_text())
        timings = {stage: (self.done(stage) or {}).get("seconds") for stage in STAGES if stage != "export"}
        report["stage_seconds"] = timings
        manifest = export(self.spec, self.workdir / self.done("train")["best_dir"], report, self.workdir / "export", self.models.model_dir)
        emitter.log("exported the adapter, manifest and report to export/")
        return {"files": len(manifest["files"])}


def run_pipeline(
    spec: PipelineSpec,
    workdir: str | Path,
    on_event: EventCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> PipelineResult:
    """Run (or resume) every stage; raises Cancelled when should_cancel() turns true between steps."""
    run = Run(spec, Path(workdir), on_event, should_cancel)
    run.dir.claim(spec)
    for stage in STAGES:
        run.run_stage(stage, getattr(run, stage))
    export_dir = run.workdir / "export"
    return PipelineResult(
        export_dir=export_dir,
        report=json.loads((export_dir / "report.json").read_text()),
        manifest=json.loads((export_dir / "manifest.json").read_text()),
    )
