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

from qdpo_core.config import INPUT_FILE_FIELDS, PipelineSpec
from qdpo_core.datasets import load_jsonl, write_jsonl
from qdpo_core.errors import Cancelled, SpecError
from qdpo_core.events import STAGES, Emitter, EventCallback


@dataclass
class PipelineResult:
    export_dir: Path
    report: dict
    manifest: dict


class ModelHolder:
    """Loads the tokenizer, FP teacher, quantized student and LoRA policy on first use, once."""

    def __init__(self, spec: PipelineSpec):
        self.spec = spec
        self._model_dir = self._tokenizer = self._teacher = self._student = None
        self.policy = None
        self._quant_info = None
        self._device = None

    @property
    def device(self) -> str:
        if self._device is None:
            from qdpo_core.models import resolve_device

            self._device = resolve_device(self.spec.model.device)
        return self._device

    @property
    def model_dir(self) -> Path:
        if self._model_dir is None:
            from qdpo_core.models import resolve_model_dir

            self._model_dir = resolve_model_dir(self.spec.model.name)
        return self._model_dir

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from qdpo_core.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_dir)
        return self._tokenizer

    @property
    def teacher(self):
        if self._teacher is None:
            from qdpo_core.models import load_full_precision

            self._teacher = load_full_precision(self.model_dir, self.device, self.spec.model.dtype)
        return self._teacher

    @property
    def student(self):
        if self._student is None:
            self._load_student()
        return self._student

    @property
    def quant_info(self):
        """What quantizing the student did: layers, bits, packed bytes."""
        if self._quant_info is None:
            self._load_student()
        return self._quant_info

    def _load_student(self) -> None:
        from qdpo_core.quantize import load_quantized

        self._student, self._quant_info = load_quantized(self.model_dir, self.spec.quantization, self.device, self.spec.model.dtype)


class Run:
    """One pipeline run over a work directory; each stage method returns its JSON summary."""

    def __init__(self, spec: PipelineSpec, workdir: Path, on_event: EventCallback | None, should_cancel: Callable[[], bool] | None):
        self.spec, self.workdir = spec, workdir
        self.emitter = Emitter(on_event)
        self.should_cancel = should_cancel or (lambda: False)
        self.models = ModelHolder(spec)

    # ---- bookkeeping --------------------------------------------------------------------
    def claim_workdir(self) -> None:
        """Bind the work directory to this spec; a resume must bring the same settings and input files."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "spec.json"
        spec = self.spec.to_dict()
        wanted = {"settings": _comparable(spec), "inputs": _input_hashes(spec)}
        if path.is_file():
            stored = json.loads(path.read_text())
            if {"settings": _comparable(stored["spec"]), "inputs": stored["inputs_sha256"]} != wanted:
                raise SpecError("workdir: the directory holds a run of a different spec or different input files; use a new directory to start over", param="workdir")
        else:
            path.write_text(json.dumps({"spec": spec, "inputs_sha256": wanted["inputs"]}, indent=1))

    def marker(self, stage: str) -> Path:
        return self.workdir / "stages" / f"{stage}.json"

    def done(self, stage: str) -> dict | None:
        path = self.marker(stage)
        return json.loads(path.read_text()) if path.is_file() else None

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
        path = self.marker(stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(path)
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
        emitter.log(f"quantized {info['quantized_layers']} layers: {info['packed_bytes'] / 1e6:.1f} MB at {info['bits']} bits vs {fp_bytes / 1e6:.1f} MB full precision")
        return {**info, "fp_memory_bytes": fp_bytes, "device": self.models.device}

    def pairs(self, emitter: Emitter) -> dict:
        from qdpo_core.pairs import source_for
        from qdpo_core.pairs.base import PairContext, run_source

        records = load_jsonl(self.workdir / "data" / "train.jsonl")
        ctx = PairContext(self.spec, self.models.tokenizer, self.models, emitter, self.workdir, self.should_cancel)
        summary = run_source(source_for(self.spec.method), records, ctx, self.workdir / "pairs.jsonl")
        for key, what in (("prompts_truncated", f"prompts were longer than dataset.max_prompt_tokens={self.spec.dataset.max_prompt_tokens} and lost their beginning"),
                          ("responses_truncated", f"supplied answers were longer than dataset.max_response_tokens={self.spec.dataset.max_response_tokens} and were cut"),
                          ("responses_cut", f"generated answers hit generation.max_new_tokens={self.spec.generation.max_new_tokens} before finishing")):
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
            reasons = ", ".join(f"{v} {k[len('dropped_'):].replace('_', ' ')}" for k, v in summary.items() if k.startswith("dropped_")) or "none built"
            raise SpecError(
                f"dataset: every pair was dropped ({reasons}), so there is nothing to train on; "
                "use more prompts, generation.do_sample with num_samples > 1, a lower bit width, "
                "or for rlaif / factuality a lower rlaif.min_confidence / factuality.min_score_gap",
                param="dataset",
            )
        return summary

    def held_out(self, emitter: Emitter | None = None):
        """Held-out prompts with FP answers (generated once, then read back)."""
        from qdpo_core.evaluate import HeldOut
        from qdpo_core.tokens import encode_prompt

        path = self.workdir / "baseline" / "fp_responses.jsonl"
        if not path.is_file():
            records = load_jsonl(self.workdir / "data" / "eval.jsonl")
            prompts = [encode_prompt(self.models.tokenizer, r["messages"], self.spec.dataset.max_prompt_tokens).ids for r in records]
            answers = self._answers(self.models.teacher, prompts, "FP answers", emitter)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(path, [{"messages": r["messages"], "prompt_ids": p, "ids": a.ids, "text": a.text, "finished": a.finished} for r, p, a in zip(records, prompts, answers)])
        rows = load_jsonl(path)
        return HeldOut([r["prompt_ids"] for r in rows], [r["ids"] for r in rows], [r["text"] for r in rows]), rows

    def _answers(self, model, prompts, label: str, emitter: Emitter | None):
        from qdpo_core.generate import Decoding, generate_all

        def tick(number: int, total: int) -> None:
            if emitter:
                emitter.progress(number, total, f"{label}: batch {number}/{total}")
            self.cancel_check()

        decoding = Decoding(max_new_tokens=self.spec.eval.max_new_tokens)
        return generate_all(model, self.models.tokenizer, prompts, decoding, self.spec.eval.batch_size, on_batch=tick)

    def score(self, model, answers_path: Path, label: str, emitter: Emitter) -> dict:
        """All held-out metrics of `model` (greedy answers cached at answers_path)."""
        from qdpo_core.evaluate import agreement_metrics, teacher_forced_metrics

        held_out, rows = self.held_out(emitter)
        if model is self.models.teacher:  # the FP answers are the reference itself
            write_jsonl(answers_path, [{"text": r["text"], "finished": r["finished"]} for r in rows])
        if not answers_path.is_file():
            answers = self._answers(model, held_out.prompts, label, emitter)
            write_jsonl(answers_path, [{"text": a.text, "finished": a.finished} for a in answers])
        texts = [r["text"] for r in load_jsonl(answers_path)]
        metrics = teacher_forced_metrics(model, self.models.teacher, held_out, self.spec.eval.batch_size, self.models.tokenizer.pad_token_id)
        metrics.update(agreement_metrics(held_out.fp_texts, texts, self._embedder()))
        return metrics

    def _embedder(self):
        if not self.spec.eval.semantic_similarity:
            return None
        from qdpo_core.semantic import embed

        return embed

    def baseline(self, emitter: Emitter) -> dict:
        fp = self.score(self.models.teacher, self.workdir / "baseline" / "fp_self.jsonl", "FP answers", emitter)
        ptq = self.score(self.models.student, self.workdir / "baseline" / "ptq_responses.jsonl", "PTQ-only answers", emitter)
        emitter.log(f"PTQ-only: token-flip rate {ptq['token_flip_rate']:.1%}, KL {ptq['kl']:.4f} nats/token", fp=fp, ptq=ptq)
        return {"fp": fp, "ptq": ptq}

    def train(self, emitter: Emitter) -> dict:
        from qdpo_core.evaluate import teacher_forced_metrics
        from qdpo_core.train import Trainer, make_policy

        baseline = self.done("baseline")
        examples = load_jsonl(self.workdir / "pairs.jsonl")
        held_out, _ = self.held_out()
        policy = self.models.policy = make_policy(self.models.student, self.spec.train, self.spec.seed)
        pad_id = self.models.tokenizer.pad_token_id

        def evaluate(model) -> dict:
            return teacher_forced_metrics(model, self.models.teacher, held_out, self.spec.eval.batch_size, pad_id)

        trainer = Trainer(
            policy,
            self.models.teacher,
            self.models.tokenizer,
            examples,
            self.spec.train,
            "kd" if self.spec.method == "kd" else "dpo",
            self.workdir / "train",
            evaluate,
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
        aligned = self.score(aligned_model, self.workdir / "evaluate" / "aligned_responses.jsonl", "aligned answers", emitter)
        baseline = self.done("baseline")
        _, rows = self.held_out()
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

            judge = judge_held_out(self.spec.eval.judge, self.models, [r["messages"] for r in rows], aligned_texts, ptq_texts, self.workdir / "evaluate" / "judge_verdicts.jsonl")
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


def _comparable(spec_dict: dict) -> dict:
    """Spec fields that must match to resume: all but the device and input file paths."""
    result = json.loads(json.dumps(spec_dict))
    result["model"].pop("device", None)
    # A resume compares input files by content, not path: another worker may mount the store elsewhere.
    for section, key in INPUT_FILE_FIELDS.values():
        result[section].pop(key, None)
    return result


def _input_hashes(spec_dict: dict) -> dict:
    from qdpo_core.export import sha256_file

    hashes = {}
    for section, key in INPUT_FILE_FIELDS.values():
        value = spec_dict[section].get(key)
        if value:
            path = Path(value)
            hashes[f"{section}.{key}"] = sha256_file(path) if path.is_file() else None
    return hashes


def run_pipeline(
    spec: PipelineSpec,
    workdir: str | Path,
    on_event: EventCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> PipelineResult:
    """Run (or resume) every stage; raises Cancelled when should_cancel() turns true between steps."""
    run = Run(spec, Path(workdir), on_event, should_cancel)
    run.claim_workdir()
    for stage in STAGES:
        run.run_stage(stage, getattr(run, stage))
    export_dir = run.workdir / "export"
    return PipelineResult(
        export_dir=export_dir,
        report=json.loads((export_dir / "report.json").read_text()),
        manifest=json.loads((export_dir / "manifest.json").read_text()),
    )
