"""Wall time of the reference job, stage by stage: nf4, QDPO (from the calibrated init), 128 built-in
training prompts, 32 held-out, answers of up to 128 tokens, 2 epochs — evaluation included.

    python bench/job_time.py                     # the reference job, in a fresh work directory
    python bench/job_time.py --method kd --train-prompts 64

Prints the stage seconds and writes bench/results/job_time.json with the machine it ran on.
The goal for the reference job is 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from machine import describe, machine, settings_of  # noqa: E402

GOAL_SECONDS = 600


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--method", default="qdpo")
    parser.add_argument("--train-prompts", type=int, default=128)
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--dtype", default="float32", help="model.dtype (auto measures bfloat16 against float32)")
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="train.compile (auto: compiled layers from 48 steps)")
    parser.add_argument("--workdir", default=str(HERE / "runs-job-time" / "reference"))
    parser.add_argument("--out", default=str(HERE / "results" / "job_time.json"))
    args = parser.parse_args(argv)

    from qdpo_core.config import PipelineSpec
    from qdpo_core.pipeline import run_pipeline

    info = machine()
    spec = PipelineSpec.from_dict(
        {
            "method": args.method,
            "model": {"name": args.model, "dtype": args.dtype},
            "quantization": {"method": args.quantization},
            "dataset": {"max_train_prompts": args.train_prompts, "max_eval_prompts": args.eval_prompts},
            "generation": {"max_new_tokens": args.max_new_tokens},
            "eval": {"max_new_tokens": args.max_new_tokens},
            "train": {"epochs": args.epochs, "compile": args.compile},
        }
    )
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)  # a timing run starts from nothing
    from qdpo_core.models import resolve_model_dir

    resolve_model_dir(args.model)  # the one-time GGUF conversion is not part of a job
    started = time.perf_counter()
    result = run_pipeline(spec, workdir, on_event=lambda e: print(f"  {e.stage}: {e.message}", flush=True) if e.type == "stage" else None)
    wall = time.perf_counter() - started
    seconds = result.report["stage_seconds"]
    seconds["export"] = round(wall - sum(v or 0 for v in seconds.values()), 1)
    lines = [
        f"Reference job: {args.quantization}, {args.method}, {args.train_prompts} training / {args.eval_prompts} held-out prompts, "
        f"{args.max_new_tokens} new tokens, {args.epochs} epochs, {result.report['training_steps']} steps ({describe(info)}; "
        f"computed in {result.report.get('compute', {}).get('dtype')}"
        f"{', training steps compiled' if result.report.get('compute', {}).get('compiled_training') else ''})",
        "",
        "| " + " | ".join(seconds) + " | total |",
        "|" + "---|" * (len(seconds) + 1),
        "| " + " | ".join(f"{v:.0f}" for v in seconds.values()) + f" | **{wall:.0f}** |",
        "",
        f"Goal: {GOAL_SECONDS} s. {'Met' if wall <= GOAL_SECONDS else 'Not met'}: {wall / 60:.1f} minutes.",
    ]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "settings": settings_of(args),
                "machine": info,
                "stage_seconds": seconds,
                "wall_seconds": round(wall, 1),
                "report_verdict": result.report["verdict"],
            },
            indent=1,
        )
    )
    out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
