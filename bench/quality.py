"""Quality benchmark: FP vs PTQ-only vs each alignment method, on the built-in held-out prompts.

    python bench/quality.py                                  # nf4 and RTN 3-bit × qdpo, kd, qdpo+kd; qdpo+nll, rlaif, factuality at 3-bit
    python bench/quality.py --runs rtn3/qdpo --train-prompts 32 --fresh       # a quicker look

Every run is a normal pipeline run in bench/runs/<quant>-<method> (resumable: rerun to continue,
--fresh to start over; --runs-dir keeps runs with other settings apart). Prints one table and writes bench/results/quality.json (+ .md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe, machine, settings_of  # noqa: E402

HERE = Path(__file__).parent
QUANTS = {
    "nf4": {"method": "nf4"},
    "int8": {"method": "int8"},
    "rtn3": {"method": "rtn", "bits": 3, "group_size": 64},
    "rtn4": {"method": "rtn", "bits": 4, "group_size": 64},
    # llama.cpp's own quantizations (qdpo_core.gguf_files); their rows are also measured in llama.cpp itself
    # (llama-cpp-python), base alone and base + adapter.gguf. Q4_1 is left out on purpose: the bundled
    # FP weights are a Q4_1 file de-quantized, so re-quantizing them to Q4_1 loses almost nothing.
    "gguf-q4_0": {"method": "gguf", "type": "Q4_0"},
    "gguf-q5_0": {"method": "gguf", "type": "Q5_0"},
}
# Learning rates from earlier trials on this model: plain DPO ruins it above ~1e-4, KD tolerates 2e-4.
# Every method starts from the default init (calibrated) unless its preset says otherwise; the
# "init…" presets train nothing (epochs 0): they measure the training-free repair alone.
METHODS = {
    "init": {"method": "kd", "train": {"epochs": 0}},
    "init-diag": {"method": "kd", "train": {"epochs": 0, "init_max_full_gram_dim": 0}},
    "init-svd": {"method": "kd", "train": {"epochs": 0, "init": "svd"}},
    "init-r64": {"method": "kd", "train": {"epochs": 0, "lora_rank": 64}},
    "init-cal256": {"method": "kd", "train": {"epochs": 0, "init_calibration_prompts": 256}},
    # the calibrated rank allocation with a higher cap per layer (train.max_layer_rank; the default is 4 × rank = 64)
    "init-max128": {"method": "kd", "train": {"epochs": 0, "max_layer_rank": 128}},
    # the damping of both Gram matrices (train.init_damping; default 1% of the mean diagonal) and more loss-gradient
    # draws per calibration sequence for the output side (train.init_gradient_samples; default 2)
    "init-damp0.001": {"method": "kd", "train": {"epochs": 0, "init_damping": 0.001}},
    "init-damp0.1": {"method": "kd", "train": {"epochs": 0, "init_damping": 0.1}},
    "init-grad8": {"method": "kd", "train": {"epochs": 0, "init_gradient_samples": 8}},
    # the parts of the default init one at a time: uniform ranks; no output (gradient) weighting; neither (the init before both)
    "init-uniform": {"method": "kd", "train": {"epochs": 0, "rank_allocation": "uniform"}},
    "init-input-alloc": {"method": "kd", "train": {"epochs": 0, "init_output_weighting": "none"}},
    "init-input": {"method": "kd", "train": {"epochs": 0, "init_output_weighting": "none", "rank_allocation": "uniform"}},
    "kd-input": {"method": "kd", "train": {"learning_rate": 2e-4, "init_output_weighting": "none", "rank_allocation": "uniform"}},
    "kd-identity": {"method": "kd", "train": {"learning_rate": 2e-4, "init": "identity"}},
    # KD from an init calibrated on 256 prompts: with --train-prompts 256, four times the data and the steps of "kd".
    "kd-cal256": {"method": "kd", "train": {"learning_rate": 2e-4, "init_calibration_prompts": 256}},
    "kd-cal256-lr5e-4": {"method": "kd", "train": {"learning_rate": 5e-4, "init_calibration_prompts": 256}},
    "kd-cakld": {"method": "kd", "train": {"learning_rate": 2e-4, "kd_objective": "cakld"}},
    "kd-reverse": {"method": "kd", "train": {"learning_rate": 2e-4, "kd_objective": "reverse"}},
    "kd-onpolicy": {"method": "kd", "train": {"learning_rate": 2e-4, "kd_on_policy_fraction": 0.5}},
    "kd-lr5e-4": {"method": "kd", "train": {"learning_rate": 5e-4}},
    "kd-lr1e-4": {"method": "kd", "train": {"learning_rate": 1e-4}},
    "kd-lr5e-5": {"method": "kd", "train": {"learning_rate": 5e-5}},
    "kd-sampled3": {"method": "kd", "train": {"learning_rate": 1e-4, "kd_sampled_answers": 3}},
    # the same at larger ranks: how much of the gap a larger adapter closes (the init's own row is its step 0)
    "kd-sampled3-r32": {"method": "kd", "train": {"learning_rate": 1e-4, "kd_sampled_answers": 3, "lora_rank": 32}},
    "kd-sampled3-r64": {"method": "kd", "train": {"learning_rate": 1e-4, "kd_sampled_answers": 3, "lora_rank": 64}},
    "kd-sampled3-r64-lr2e-5": {"method": "kd", "train": {"learning_rate": 2e-5, "kd_sampled_answers": 3, "lora_rank": 64}},
    # kd-sampled3 from the init calibrated on 256 prompts (the best rtn3 init); run with --epochs 4 for 256 steps
    "kd-cal256-sampled3": {"method": "kd", "train": {"learning_rate": 1e-4, "kd_sampled_answers": 3, "init_calibration_prompts": 256}},
    # the same plus the top-1 agreement hinge (train.kd_top1_weight): aimed at the greedy flips KL barely weighs
    "kd-sampled3-top1": {"method": "kd", "train": {"learning_rate": 1e-4, "kd_sampled_answers": 3, "kd_top1_weight": 1.0}},
    # kd-sampled3 with the normalisation layers' scales trained too (train.train_norms)
    "kd-sampled3-norms": {"method": "kd", "train": {"learning_rate": 1e-4, "kd_sampled_answers": 3, "train_norms": True}},
    # kd-sampled3 with LoRA+ (train.lora_plus_ratio: B learns 8 times faster than A)
    "kd-sampled3-loraplus": {"method": "kd", "train": {"learning_rate": 1e-4, "kd_sampled_answers": 3, "lora_plus_ratio": 8}},
    # LoRA+ with the norm scales trained too (at ratio × lr, where plain train_norms barely moved them)
    "kd-sampled3-loraplus-norms": {"method": "kd", "train": {"learning_rate": 1e-4, "kd_sampled_answers": 3, "lora_plus_ratio": 8, "train_norms": True}},
    # kd-sampled3 with DoRA (train.dora: a learned scale per output channel of every adapted layer)
    "kd-sampled3-dora": {"method": "kd", "train": {"learning_rate": 1e-4, "kd_sampled_answers": 3, "dora": True}},
    "kd-all": {"method": "kd", "train": {"learning_rate": 2e-4, "kd_positions": "all"}},
    "qdpo+nll-rptq": {"method": "qdpo", "train": {"learning_rate": 2e-4, "nll_weight": 1.0}, "generation": {"rejected_model": "ptq"}},
    "auto": {"method": "auto", "train": {"learning_rate": 2e-4}},
    "qdpo": {"method": "qdpo", "train": {"learning_rate": 1e-4}},
    "kd": {"method": "kd", "train": {"learning_rate": 2e-4}},
    "qdpo+kd": {"method": "qdpo", "train": {"learning_rate": 2e-4, "kd_weight": 0.5}},
    # RPO-style: DPO plus the NLL of the chosen (FP) answer, which anchors the policy to the FP text.
    "qdpo+nll": {"method": "qdpo", "train": {"learning_rate": 2e-4, "nll_weight": 1.0}},
    # The labeler is the bundled FP model itself; at 135M it answers "1" whatever it is shown, so the
    # swap-averaged preferences sit near 0.5 and any lean at all has to count (min_confidence 0).
    "rlaif": {"method": "rlaif", "train": {"learning_rate": 1e-4}, "rlaif": {"min_confidence": 0.0}},
    # FactTune-MC: 3 answers per prompt, the first 2 claims of each re-asked twice (~12 short generations per prompt).
    "factuality": {
        "method": "factuality",
        "train": {"learning_rate": 1e-4},
        "factuality": {"scorer": "consistency", "num_samples": 3, "max_claims": 2, "num_questions": 2, "min_score_gap": 0.0},
    },
    # The cheap proxy: mean token log-prob of each answer under the FP model (one forward pass per answer).
    "factuality-logprob": {"method": "factuality", "train": {"learning_rate": 1e-4}, "factuality": {"scorer": "logprob", "num_samples": 3}},
}
# The QDPO family and its KD baseline at two bit widths; RPO and the feedback methods where the gap is widest.
DEFAULT_RUNS = "nf4/qdpo,nf4/kd,nf4/qdpo+kd,rtn3/qdpo,rtn3/kd,rtn3/qdpo+kd,rtn3/qdpo+nll,rtn3/rlaif,rtn3/factuality"
COLUMNS = ("token_flip_rate", "kl", "perplexity", "exact_match", "rouge_l", "cosine")


def spec_for(quant: str, method: str, args) -> dict:
    preset = json.loads(json.dumps(METHODS[method]))
    spec = {
        "method": preset.pop("method"),
        "model": {"name": args.model},
        "quantization": QUANTS[quant],
        "dataset": {"max_train_prompts": args.train_prompts, "max_eval_prompts": args.eval_prompts},
        "generation": {"max_new_tokens": args.max_new_tokens, "batch_size": 8},
        "eval": {"max_new_tokens": args.max_new_tokens, "batch_size": 8, "semantic_similarity": True},
        "train": {
            "epochs": args.epochs,
            "batch_size": 4,
            "lora_rank": 16,
            "beta": 0.1,
            "checkpoint_every": args.checkpoint_every,
            "early_stopping_patience": 0,
        },
        "seed": args.seed,
    }
    for key, value in preset.items():
        spec.setdefault(key, {}).update(value)
    return spec


# What a stage's output depends on: runs that agree on these share it (copied, not recomputed).
# The baseline (FP and PTQ-only answers and scores on the held-out prompts) depends on the model,
# the quantization, the held-out data and the evaluation; the init also on the training prompts,
# the LoRA shape and the init settings (and the calibration answers' length).
SHARED_STAGES = {
    "baseline": {"": ("seed",), "model": None, "quantization": None, "dataset": None, "eval": None},
    "init": {
        "": ("seed",),
        "model": None,
        "quantization": None,
        "dataset": None,
        "eval": None,
        "generation": ("max_new_tokens", "batch_size"),
        "train": (
            "init",
            "init_calibration_prompts",
            "init_damping",
            "init_max_full_gram_dim",
            "rank_allocation",
            "max_layer_rank",
            "init_output_weighting",
            "init_gradient_samples",
            "lora_rank",
            "lora_alpha",
            "target_modules",
            "selection_metric",
            # they change what the saved init adapter holds (norm scales, DoRA magnitudes set from the init)
            "train_norms",
            "dora",
        ),
    },
}
STAGE_FILES = {"baseline": ("data", "baseline"), "init": ("init",)}


def stage_key(spec: dict, stage: str) -> str:
    import hashlib

    parts = {}
    for section, keys in SHARED_STAGES[stage].items():
        source = spec if section == "" else spec[section]
        parts[section] = source if keys is None else {k: source[k] for k in keys}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def reuse_shared_stages(spec: dict, workdir: Path, cache: Path) -> list[str]:
    """Copy finished shared stages from the bench's cache into a new run (before it starts)."""
    reused = []
    for stage in SHARED_STAGES:
        source = cache / f"{stage}-{stage_key(spec, stage)}"
        if (workdir / "stages" / f"{stage}.json").is_file() or not (source / "stages" / f"{stage}.json").is_file():
            continue
        for name in (*STAGE_FILES[stage], f"stages/{stage}.json"):
            target = workdir / name
            if (source / name).is_dir():
                shutil.copytree(source / name, target, dirs_exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source / name, target)
        reused.append(stage)
    return reused


def store_shared_stages(spec: dict, workdir: Path, cache: Path) -> None:
    for stage in SHARED_STAGES:
        target = cache / f"{stage}-{stage_key(spec, stage)}"
        if (target / "stages" / f"{stage}.json").is_file() or not (workdir / "stages" / f"{stage}.json").is_file():
            continue
        for name in (*STAGE_FILES[stage], f"stages/{stage}.json"):
            if (workdir / name).is_dir():
                shutil.copytree(workdir / name, target / name, dirs_exist_ok=True)
            else:
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(workdir / name, target / name)


def run_one(quant: str, method: str, args) -> dict:
    from qdpo_core.config import PipelineSpec
    from qdpo_core.pipeline import run_pipeline

    workdir = Path(args.runs_dir) / f"{quant}-{method}"
    if args.fresh and workdir.exists():
        shutil.rmtree(workdir)
    spec = PipelineSpec.from_dict(spec_for(quant, method, args))
    cache = Path(args.runs_dir) / "_shared"
    if not args.no_share:
        workdir.mkdir(parents=True, exist_ok=True)
        reused = reuse_shared_stages(spec.to_dict(), workdir, cache)
        if reused:
            print(f"  [{quant}/{method}] reusing the {' and '.join(reused)} of an earlier run with the same settings", flush=True)
    started = time.monotonic()

    def show(event) -> None:
        if event.type in ("stage", "checkpoint") or event.level != "info":
            print(f"  [{quant}/{method}] {event.stage}: {event.message}", flush=True)

    result = run_pipeline(spec, workdir, on_event=show)
    if not args.no_share:
        store_shared_stages(spec.to_dict(), workdir, cache)
    report = result.report
    llama_cpp = None
    if spec.quantization.method == "gguf":
        from qdpo_core.gguf_runtime import held_out_metrics

        try:
            llama_cpp = held_out_metrics(workdir, args.max_new_tokens)
        except ImportError as exc:  # reported in the row, the torch numbers stand on their own
            print(f"  [{quant}/{method}] not measured in llama.cpp: {exc}", flush=True)
    return {
        "llama_cpp": llama_cpp,
        "quant": quant,
        "method": method,
        "fp": report["fp"],
        "ptq": report["ptq"],
        "aligned": report["aligned"],
        "gap_closed": report["gap_closed"],
        "selected_checkpoint": report["selected_checkpoint"],
        "checkpoints": report["checkpoints"],
        "pairs": report["pairs"],
        "stage_seconds": report.get("stage_seconds"),
        "wall_seconds_this_call": round(time.monotonic() - started, 1),
        "spec": spec.to_dict(),
    }


def _fmt(value, percent=False) -> str:
    if value is None:
        return "–"
    return f"{value:.1%}" if percent else f"{value:.3f}"


def table(rows: list[dict]) -> str:
    head = "| quant | model | flip rate | KL | ppl | exact | ROUGE-L | cosine | gap closed (flip / KL) | ckpt | stage seconds (pairs / train / eval) |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    seen_baselines = set()
    for row in rows:
        for label, metrics in (("FP", row["fp"]), ("PTQ-only", row["ptq"])):
            if (row["quant"], label) in seen_baselines:
                continue
            seen_baselines.add((row["quant"], label))
            cells = [_fmt(metrics.get(c), c in ("token_flip_rate", "exact_match")) for c in COLUMNS]
            lines.append(f"| {row['quant']} | {label} | " + " | ".join(cells) + " | | | |")
        cells = [_fmt(row["aligned"].get(c), c in ("token_flip_rate", "exact_match")) for c in COLUMNS]
        closed = row["gap_closed"]
        seconds = row.get("stage_seconds") or {}
        timing = " / ".join(str(round(seconds.get(s) or 0)) for s in ("pairs", "train", "evaluate"))
        lines.append(
            f"| {row['quant']} | {row['method']} | "
            + " | ".join(cells)
            + f" | {_fmt(closed.get('token_flip_rate'), True)} / {_fmt(closed.get('kl'), True)} | {row['selected_checkpoint']} | {timing} |"
        )
        for label, metrics in (("PTQ-only", "ptq"), (row["method"], "aligned")) if row.get("llama_cpp") else ():
            if label == "PTQ-only" and (row["quant"], "llama.cpp PTQ") in seen_baselines:
                continue
            seen_baselines.add((row["quant"], "llama.cpp PTQ"))
            cells = [_fmt(row["llama_cpp"][metrics].get(c), c in ("token_flip_rate", "exact_match")) for c in COLUMNS]
            lines.append(f"| {row['quant']} | {label} in llama.cpp | " + " | ".join(cells) + " | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="comma list of quant/method, e.g. rtn3/qdpo,nf4/kd")
    parser.add_argument("--quants", help=f"with --methods: every combination instead of --runs ({', '.join(QUANTS)})")
    parser.add_argument("--methods", help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--train-prompts", type=int, default=64)
    parser.add_argument("--eval-prompts", type=int, default=40, help="the built-in eval split has 40")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="delete earlier runs first")
    parser.add_argument(
        "--no-share", action="store_true", help="recompute the baseline and init of every run instead of copying them from a run with the same settings"
    )
    parser.add_argument("--out", default=str(HERE / "results" / "quality.json"))
    parser.add_argument("--runs-dir", default=str(HERE / "runs"), help="where the run workdirs live (one per setting you compare)")
    args = parser.parse_args(argv)

    rows = []
    machine_info = machine()  # before the runs: the load average at start is the machine's, not the bench's
    print(f"machine: {describe(machine_info)}", flush=True)
    if args.quants or args.methods:
        runs = [(q, m) for q in (args.quants or "nf4,rtn3").split(",") for m in (args.methods or "qdpo,kd").split(",")]
    else:
        runs = [tuple(item.split("/", 1)) for item in args.runs.split(",")]
    for quant, method in runs:
        if quant not in QUANTS or method not in METHODS:
            parser.error(f"unknown run {quant}/{method}: quants are {', '.join(QUANTS)}; methods are {', '.join(METHODS)}")
    for quant, method in runs:
        print(f"== {quant} / {method}", flush=True)
        rows.append(run_one(quant, method, args))
    markdown = table(rows)
    print(markdown)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in settings_of(args).items() if k != "fresh"}
    out.write_text(json.dumps({"settings": settings, "machine": machine_info, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(markdown + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
