"""`qdpo run`: the whole pipeline on this machine, with progress bars, then the report.

    qdpo run --model smollm2-135m-instruct --quant nf4 --method qdpo --out runs/nf4
    qdpo run --quant rtn --bits 3 --method kd --epochs 2 --set train.learning_rate=2e-4
    qdpo run --method dpo --pairs my_pairs.jsonl --set dataset.max_response_tokens=512

Rerunning the same command on the same --out resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qdpo_core.config import PipelineSpec
from qdpo_core.errors import Cancelled, QdpoError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qdpo run", description="Align a quantized model locally (quantize → pairs → train → evaluate → export).")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="registered name, local HF directory or hub id")
    parser.add_argument("--quant", default="nf4", help="nf4 | fp4 | int8 | rtn")
    parser.add_argument("--bits", type=int, help="rtn bit width: 2, 3, 4 or 8")
    parser.add_argument("--group-size", type=int, help="rtn group size (default 64)")
    parser.add_argument("--method", default="qdpo", help="qdpo | dpo | kd | rlaif | factuality")
    parser.add_argument("--prompts", help="prompts JSONL (default: the built-in prompt set)")
    parser.add_argument("--pairs", help="preference pairs JSONL (method dpo)")
    parser.add_argument("--eval-prompts", help="held-out prompts JSONL")
    parser.add_argument("--max-train-prompts", type=int)
    parser.add_argument("--max-eval-prompts", type=int)
    parser.add_argument("--max-new-tokens", type=int, help="cap on generated tokens (pairs and evaluation)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--beta", type=float)
    parser.add_argument("--loss", help="sigmoid | hinge | ipo")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lora-rank", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--spec", help="a JSON file with a whole PipelineSpec (flags override it)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="any other setting, value parsed as JSON when it can be")
    parser.add_argument("--out", default="runs/latest", help="work directory (resumable)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    return parser


def spec_from_args(args: argparse.Namespace) -> PipelineSpec:
    data: dict = json.loads(Path(args.spec).read_text()) if args.spec else {}

    def put(path: str, value) -> None:
        if value is None:
            return
        node = data
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    put("method", args.method)
    put("seed", args.seed)
    put("model.name", args.model)
    put("model.device", args.device)
    put("quantization.method", args.quant)
    put("quantization.bits", args.bits)
    put("quantization.group_size", args.group_size)
    put("dataset.prompts", args.prompts)
    put("dataset.pairs", args.pairs)
    put("dataset.eval_prompts", args.eval_prompts)
    put("dataset.max_train_prompts", args.max_train_prompts)
    put("dataset.max_eval_prompts", args.max_eval_prompts)
    put("generation.max_new_tokens", args.max_new_tokens)
    put("eval.max_new_tokens", args.max_new_tokens)
    for flag, path in (
        ("epochs", "epochs"),
        ("learning_rate", "learning_rate"),
        ("beta", "beta"),
        ("loss", "loss"),
        ("batch_size", "batch_size"),
        ("lora_rank", "lora_rank"),
    ):
        put(f"train.{path}", getattr(args, flag))
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise QdpoError(f"--set {item!r}: write SECTION.FIELD=VALUE, e.g. train.beta=0.2", param="--set")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        put(key.strip(), value)
    return PipelineSpec.from_dict(data)


class ProgressView:
    """Rich progress bars fed by pipeline events: one bar per stage, log lines above them."""

    def __init__(self, progress):
        self.progress = progress
        self.tasks: dict[str, int] = {}

    def __call__(self, event) -> None:
        stage = event.stage or ""
        if event.type == "stage" and event.message == "started":
            self.tasks[stage] = self.progress.add_task(stage, total=None)
        elif event.type in ("progress", "metrics") and event.total:
            task = self.tasks.get(stage)
            if task is not None:
                label = stage if event.type == "progress" else f"{stage} loss {event.data.get('loss', 0):.4f}"
                self.progress.update(task, completed=event.step, total=event.total, description=label)
        elif event.type == "stage" and event.message == "finished":
            task = self.tasks.get(stage)
            if task is not None:
                total = self.progress.tasks[task].total or 1
                self.progress.update(task, completed=total, total=total)
        elif event.type in ("log", "checkpoint"):
            style = {"warning": "yellow", "error": "red"}.get(event.level, "dim")
            self.progress.console.print(f"[{style}]{stage}: {event.message}[/{style}]")


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from qdpo_core.pipeline import run_pipeline
    from qdpo_core.report import print_report

    args = build_parser().parse_args(argv)
    try:
        spec = spec_from_args(args)
        columns = (SpinnerColumn(), TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        # Progress and logs go to stderr, so stdout carries only the report (pipe-friendly with --json).
        with Progress(*columns, transient=False, console=Console(stderr=True)) as progress:
            result = run_pipeline(spec, Path(args.out), on_event=ProgressView(progress))
    except (Cancelled, KeyboardInterrupt):
        print(f"stopped; finished work is kept in {args.out}: rerun the same command to resume", file=sys.stderr)
        return 130
    except QdpoError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.report, indent=2))
    else:
        print_report(result.report)
        print(f"adapter: {result.export_dir / 'adapter'}  (manifest: {result.export_dir / 'manifest.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
