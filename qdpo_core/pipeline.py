"""run_pipeline: prepare → quantize → baseline → init → pairs → train → evaluate → export, resumable per stage.

    from qdpo_core.config import PipelineSpec
    from qdpo_core.pipeline import run_pipeline
    result = run_pipeline(PipelineSpec.from_dict({"method": "qdpo"}), "runs/demo", on_event=print)
    result.export_dir  # adapter/ + manifest.json + report.json + report.md

Work directory layout (every file is written atomically; a stage whose marker exists is skipped):

    spec.json                      the spec this directory belongs to (a different spec is refused)
    stages/<stage>.json            completion marker + stage summary (counts, timings)
    data/train.jsonl, data/eval.jsonl      normalised prompts / pairs after the split
    baseline/                      FP and PTQ-only greedy answers on held-out prompts
    init/fp_answers.jsonl          calibration prompts with the FP model's greedy answers
    init/adapter/                  the initialised LoRA adapter (PEFT), step 0 of training
    pairs.jsonl                    training examples: messages, chosen, rejected (+ token ids)
    train/reference_logps.json     reference log-probs (the initialised model), computed once
    train/checkpoints/step-N/      adapter + optimizer + RNG + trainer_state.json (resume point)
    train/best/                    best adapter by held-out metric (step 0: the initialised adapter)
    evaluate/                      the aligned model's answers
    export/                        adapter/ manifest.json report.json report.md
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

    def finished(self, stage: str) -> dict:
        """The summary of an earlier stage this one builds on (the stages run in order)."""
        summary = self.done(stage)
        if summary is None:
            raise RuntimeError(f"stage {stage} has not finished")
        return summary

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
        self.check_endpoints()
        write_prepared(self.workdir, train, held_out)
        emitter.log(f"{summary['train_records']} training records and {summary['eval_prompts']} held-out prompts from the {summary['source']}")
        return summary

    def check_endpoints(self) -> None:
        """Endpoint labelers and judges must still pass the outbound policy (DNS may have changed since
        the job was accepted): refused here, before any model is trained, not after."""
        from qdpo_core.outbound import current_policy

        places = [("eval.judge", self.spec.eval.judge)]
        if self.spec.method in ("rlaif", "factuality"):
            places.append((f"{self.spec.method}.labeler", getattr(self.spec, self.spec.method).labeler))
        for where, labeler in places:
            if labeler is not None and labeler.kind == "openai" and labeler.base_url:
                current_policy().check_url(labeler.base_url, f"{where}.base_url")

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
        return {**info, "fp_memory_bytes": fp_bytes, "device": self.models.device, "dtype": self.models.dtype}

    def init(self, emitter: Emitter) -> dict:
        """Step 0: the LoRA adapter initialised from the quantization error, kept only if it beats PTQ-only."""
        from qdpo_core.calibrate import GradientGramCollector, collect_grams, initialise_adapter, plan_ranks
        from qdpo_core.train import make_policy, reset_to_identity, target_layer_names

        spec = self.spec.train
        batches = self._calibration_batches(emitter) if spec.init == "calibrated" else None
        emitter.log(f"initialising the adapter: {spec.init}" + (f" on {sum(len(b.input_ids) for b in batches)} calibration sequences" if batches else ""))
        collector, gradients, ranks, ladders = None, None, None, None
        timings: dict[str, float] = {}
        if spec.init == "calibrated":
            started = time.monotonic()
            names = target_layer_names(self.models.student, spec.target_modules)
            collector = collect_grams(self.models.teacher, names, batches or [])
            if spec.init_output_weighting == "gradient":
                gradients = GradientGramCollector(self.models.teacher, names, spec.init_gradient_samples, self.spec.seed)
                gradients.run(batches or [], on_batch=lambda number, total: emitter.progress(number, total, f"init: loss gradients, batch {number}/{total}"))
            timings["activations_seconds"] = round(time.monotonic() - started, 2)
            emitter.log(f"calibration activations{' and loss gradients' if gradients else ''} in {timings['activations_seconds']:.0f} s")
        if spec.rank_allocation == "calibrated":
            started = time.monotonic()
            assert collector is not None  # the spec allows this allocation with the calibrated init only
            ranks, ladders = plan_ranks(
                self.models.student,
                self.models.teacher,
                names,
                collector,
                spec.lora_rank,
                spec.init_damping,
                spec.init_max_full_gram_dim,
                max_rank=spec.max_layer_rank,
                gradients=gradients,
            )
            timings["allocation_seconds"] = round(time.monotonic() - started, 2)
            emitter.log(
                f"ranks allocated by the calibrated error in {timings['allocation_seconds']:.0f} s: {_rank_summary(ranks)} "
                f"(the parameters of rank {spec.lora_rank} everywhere)"
            )
        policy = self.models.policy = make_policy(self.models.student, spec, self.spec.seed, self.spec.model.name, ranks)
        result = initialise_adapter(
            policy,
            self.models.teacher,
            spec.init,
            batches,
            damping=spec.init_damping,
            max_full_gram_dim=spec.init_max_full_gram_dim,
            on_layer=lambda number, total: emitter.progress(number, total, f"init: layer {number}/{total}"),
            collector=collector,
            gradients=gradients,
            ladders=ladders,
        )
        summary = result.to_dict()
        summary["timings"].update(timings)
        summary["seconds"] = round(result.seconds + sum(timings.values()), 2)
        summary["rank_allocation"] = spec.rank_allocation
        if ranks is not None:
            summary["rank"] = spec.lora_rank
            summary["ranks"] = ranks
        summary["kept"] = True
        if spec.init != "identity":
            metrics = self.evaluator.teacher_forced(policy)
            ptq = self.finished("baseline")["ptq"]
            key = spec.selection_metric
            summary["metrics"] = metrics
            if metrics[key] >= ptq[key]:
                summary["kept"] = False
                reset_to_identity(policy, self.spec.seed)
                emitter.warn(
                    f"the {spec.init} init was not better than PTQ-only on held-out {key} ({metrics[key]:.4f} vs {ptq[key]:.4f}); training starts from the identity adapter"
                )
            else:
                emitter.log(
                    f"{spec.init} init in {result.seconds:.0f} s: token-flip rate {ptq['token_flip_rate']:.1%} → {metrics['token_flip_rate']:.1%}, "
                    f"KL {ptq['kl']:.4f} → {metrics['kl']:.4f} (held-out, no training)",
                    metrics=metrics,
                )
        policy.save_pretrained(self.workdir / "init" / "adapter", save_embedding_layers=False)  # no hub lookup of the base name
        return summary

    def _calibration_batches(self, emitter: Emitter):
        """Calibration sequences: a seeded choice of training prompts with the FP model's greedy answers."""
        import random

        from qdpo_core.datasets import write_jsonl
        from qdpo_core.generate import Decoding, generate_all
        from qdpo_core.tokens import collate, encode_prompt

        path = self.workdir / "init" / "fp_answers.jsonl"
        if not path.is_file():
            records = load_jsonl(self.workdir / "data" / "train.jsonl")
            limit = self.spec.train.init_calibration_prompts
            if len(records) > limit:
                records = [records[i] for i in sorted(random.Random(self.spec.seed).sample(range(len(records)), limit))]
            prompts = [encode_prompt(self.models.tokenizer, r["messages"], self.spec.dataset.max_prompt_tokens).ids for r in records]

            def tick(number: int, total: int) -> None:
                emitter.progress(number, total, f"init: FP answers for calibration, batch {number}/{total}")
                self.cancel_check()

            decoding = Decoding(max_new_tokens=self.spec.generation.max_new_tokens)
            answers = generate_all(self.models.teacher, self.models.tokenizer, prompts, decoding, self.spec.generation.batch_size, on_batch=tick)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(path, [{"prompt_ids": p, "ids": a.ids, "text": a.text, "finished": a.finished} for p, a in zip(prompts, answers)])
        rows = sorted(load_jsonl(path), key=lambda r: len(r["prompt_ids"]) + len(r["ids"]))  # similar lengths together: little padding
        size = self.spec.eval.batch_size
        pad = self.models.tokenizer.pad_token_id
        return [collate([r["prompt_ids"] for r in rows[i : i + size]], [r["ids"] for r in rows[i : i + size]], pad) for i in range(0, len(rows), size)]

    def initialised_policy(self):
        """The quantized model with the step-0 adapter, whether or not the init stage ran in this process."""
        if self.models.policy is None:
            from qdpo_core.checkpoint import load_adapter_weights
            from qdpo_core.train import make_policy

            ranks = self.finished("init").get("ranks")
            policy = make_policy(self.models.student, self.spec.train, self.spec.seed, self.spec.model.name, ranks)
            load_adapter_weights(policy, self.workdir / "init" / "adapter")
            self.models.policy = policy
        return self.models.policy

    def pairs(self, emitter: Emitter) -> dict:
        from qdpo_core.pairs import source_for
        from qdpo_core.pairs.base import PairContext, run_source

        if self.spec.train.epochs == 0:
            emitter.log("train.epochs is 0: no training, so no pairs are built")
            return {"source": self.spec.method, "skipped": "train.epochs is 0", "examples": 0}

        if self.spec.method in ("rlaif", "factuality") or (self.spec.method in ("qdpo", "auto") and self.spec.generation.rejected_model == "init"):
            self.initialised_policy()  # the answers come from the model being repaired, in this process or after a resume alike
        records = load_jsonl(self.workdir / "data" / "train.jsonl")
        ctx = PairContext(self.spec, self.models.tokenizer, self.models, emitter, self.workdir, self.should_cancel)
        auto = self.spec.method == "auto"
        summary = run_source(source_for(self.spec.method), records, ctx, self.workdir / "pairs.jsonl", self.workdir / "pairs_all.jsonl" if auto else None)
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
        if summary["examples"] == 0 and auto and any(c in ("init", "kd") for c in self.spec.auto.candidates):
            emitter.warn("every QDPO pair was identical, so the qdpo candidates are skipped; init and kd still run")
        elif summary["examples"] == 0:
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
        from qdpo_core.train import Trainer

        baseline, init = self.finished("baseline"), self.finished("init")
        if self.spec.train.epochs == 0:
            from qdpo_core.checkpoint import copy_adapter

            copy_adapter(self.workdir / "init" / "adapter", self.workdir / "train" / "best")
            emitter.log("train.epochs is 0: the export is the initialised adapter")
            return {
                "best_step": 0,
                "best_metrics": init.get("metrics") or baseline["ptq"],
                "best_dir": "train/best",
                "steps": 0,
                "total_steps": 0,
                "stopped_early": False,
                "checkpoint_evals": [],
                "history": [],
            }
        policy = self.initialised_policy()  # pairs only read it: it still holds the step-0 weights
        start = init["metrics"] if init.get("kept") and init.get("metrics") else baseline["ptq"]
        if self.spec.method == "auto":
            return self._train_candidates(emitter, start)
        examples = load_jsonl(self.workdir / "pairs.jsonl")

        trainer = Trainer(
            policy,
            self.models.teacher,
            self.models.tokenizer,
            examples,
            self.spec.train,
            "kd" if self.spec.method == "kd" else "dpo",
            self.workdir / "train",
            self.evaluator.teacher_forced,
            {k: start[k] for k in ("token_flip_rate", "kl", "perplexity")},
            emitter,
            self.should_cancel,
            self.spec.seed,
            max_new_tokens=self.spec.generation.max_new_tokens,
        )
        result = trainer.run()
        if result.best_step == 0:
            what = "the initialised adapter" if init.get("kept") and init.get("init") != "identity" else "the identity adapter (the PTQ-only model)"
            emitter.warn(f"no checkpoint beat the starting model on held-out {self.spec.train.selection_metric}; the export is step 0, {what}")
        return {**result.to_dict(), "best_dir": str(result.best_dir.relative_to(self.workdir))}

    def _train_candidates(self, emitter: Emitter, start: dict) -> dict:
        """Method auto: every candidate from the same initialised adapter; the best on held-out data wins."""
        import dataclasses

        from qdpo_core.checkpoint import copy_adapter
        from qdpo_core.config import AUTO_CANDIDATES
        from qdpo_core.train import Trainer

        key = self.spec.train.selection_metric
        results: list[dict] = []
        state_path = self.workdir / "train" / "candidates.json"
        done = {r["name"]: r for r in (json.loads(state_path.read_text()) if state_path.is_file() else [])}
        pairs = load_jsonl(self.workdir / "pairs.jsonl")
        for number, name in enumerate(self.spec.auto.candidates, start=1):
            if name in done:
                results.append(done[name])
                continue
            started = time.monotonic()
            emitter.log(f"candidate {number}/{len(self.spec.auto.candidates)}: {name}")
            directory = self.workdir / "train" / name
            candidate = AUTO_CANDIDATES[name]
            result: dict[str, Any]
            if candidate is None:
                copy_adapter(self.workdir / "init" / "adapter", directory / "best")
                result = {"name": name, "metrics": {k: start[k] for k in ("token_flip_rate", "kl", "perplexity")}, "best_step": 0, "steps": 0}
            else:
                objective, extra = candidate
                examples = load_jsonl(self.workdir / "pairs_all.jsonl") if objective == "kd" else pairs
                if not examples:
                    emitter.warn(f"candidate {name}: no training examples (every QDPO pair was identical); skipped")
                    continue
                self._load_adapter(self.workdir / "init" / "adapter")  # every candidate starts from step 0
                trainer = Trainer(
                    self.initialised_policy(),
                    self.models.teacher,
                    self.models.tokenizer,
                    examples,
                    dataclasses.replace(self.spec.train, **extra),
                    objective,
                    directory,
                    self.evaluator.teacher_forced,
                    {k: start[k] for k in ("token_flip_rate", "kl", "perplexity")},
                    emitter,
                    self.should_cancel,
                    self.spec.seed,
                    max_new_tokens=self.spec.generation.max_new_tokens,
                )
                trained = trainer.run()
                result = {
                    "name": name,
                    "metrics": {k: trained.best_metrics[k] for k in ("token_flip_rate", "kl", "perplexity") if k in trained.best_metrics},
                    "best_step": trained.best_step,
                    "steps": trained.steps,
                    "checkpoint_evals": trained.checkpoint_evals,
                    "history": trained.history,
                }
            result["best_dir"] = str((directory / "best").relative_to(self.workdir))
            result["seconds"] = round(time.monotonic() - started, 1)
            results.append(result)
            done[name] = result
            state_path.parent.mkdir(parents=True, exist_ok=True)
            state_path.write_text(json.dumps(list(done.values()), indent=1))
            emitter.log(
                f"candidate {name}: held-out token-flip rate {result['metrics']['token_flip_rate']:.1%}, KL {result['metrics']['kl']:.4f}", candidate=name
            )
        winner = min(results, key=lambda r: r["metrics"][key])  # ties: the earlier, cheaper candidate
        copy_adapter(self.workdir / winner["best_dir"], self.workdir / "train" / "best")
        emitter.log(f"method auto: {winner['name']} wins on held-out {key} ({winner['metrics'][key]:.4f})", winner=winner["name"])
        return {
            "best_step": winner["best_step"],
            "best_metrics": winner["metrics"],
            "best_dir": "train/best",
            "steps": sum(r["steps"] for r in results),
            "total_steps": sum(r["steps"] for r in results),
            "stopped_early": False,
            "checkpoint_evals": winner.get("checkpoint_evals", []),
            "history": winner.get("history", []),
            "winner": winner["name"],
            "candidates": [{k: r[k] for k in ("name", "metrics", "best_step", "steps", "seconds")} for r in results],
        }

    def _load_adapter(self, directory: Path) -> None:
        from qdpo_core.checkpoint import load_adapter_weights

        load_adapter_weights(self.initialised_policy(), directory)

    def evaluate(self, emitter: Emitter) -> dict:
        from qdpo_core.report import build_report

        trained = self.finished("train")
        aligned_model = self._aligned_policy(self.workdir / trained["best_dir"])
        aligned = self.evaluator.score(aligned_model, self.workdir / "evaluate" / "aligned_responses.jsonl", "aligned answers", emitter)
        baseline = self.finished("baseline")
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
            compute={
                "device": (self.done("quantize") or {}).get("device"),
                "dtype": (self.done("quantize") or {}).get("dtype"),
                "compiled_training": bool(trained.get("compiled")),
            },
            samples=samples,
            init=self._init_summary(),
            **({"judge": judge} if judge is not None else {}),
            **({"auto": {"winner": trained["winner"], "candidates": trained["candidates"]}} if "winner" in trained else {}),
        )
        path = self.workdir / "evaluate" / "report.json"
        path.write_text(json.dumps(report, indent=2, ensure_ascii=False))
        emitter.log(report["verdict"])
        return {"report": str(path.relative_to(self.workdir))}

    def _init_summary(self) -> dict:
        init = self.done("init") or {}
        keys = (
            "init",
            "kept",
            "rank",
            "rank_allocation",
            "ranks",
            "metrics",
            "seconds",
            "calibration_sequences",
            "calibration_tokens",
            "full_gram_layers",
            "diagonal_layers",
            "output_weighting",
            "gradient_draws",
            "relative_error",
        )
        return {k: init[k] for k in keys if k in init}

    def _aligned_policy(self, best_dir: Path):
        """The quantized model with the selected adapter, whether or not training ran in this process."""
        from qdpo_core.checkpoint import load_adapter_weights

        policy = self.initialised_policy()
        load_adapter_weights(policy, best_dir)
        return policy

    def export(self, emitter: Emitter) -> dict:
        from qdpo_core.export import export

        report = json.loads((self.workdir / "evaluate" / "report.json").read_text())
        timings = {stage: (self.done(stage) or {}).get("seconds") for stage in STAGES if stage != "export"}
        report["stage_seconds"] = timings
        manifest = export(self.spec, self.workdir / self.finished("train")["best_dir"], report, self.workdir / "export", self.models.model_dir)
        emitter.log("exported the adapter, manifest and report to export/")
        return {"files": len(manifest["files"])}


def _rank_summary(ranks: dict[str, int]) -> str:
    """'q_proj 4–40 (mean 12.1), …' per layer kind, for the log."""
    kinds: dict[str, list[int]] = {}
    for name, rank in ranks.items():
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append(rank)
    return ", ".join(f"{kind} {min(r)}–{max(r)} (mean {sum(r) / len(r):.1f})" for kind, r in sorted(kinds.items()))


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
