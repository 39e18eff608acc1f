"""No-grad passes against a plain batched forward: held-out scoring and reference log-probs, tokens/s.

    python bench/scoring_throughput.py          # 40 built-in eval prompts with the FP model's 64-token answers

"Plain" is what a straightforward implementation does: batches in data order, the model's
forward over every position (full-vocabulary logits for the prompt too). The project's passes
(qdpo_core.evaluate.teacher_forced_metrics, qdpo_core.tokens.sequence_logps) must reach at
least 70% of its tokens/s. Writes bench/results/scoring_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from machine import describe, machine, settings_of  # noqa: E402

GOAL = 0.7


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results" / "scoring_throughput.json"))
    args = parser.parse_args(argv)

    import torch

    from qdpo_core.config import QuantSpec
    from qdpo_core.evaluate import HeldOut, TeacherCache, teacher_forced_metrics
    from qdpo_core.generate import Decoding, generate_all
    from qdpo_core.models import load_full_precision, load_tokenizer, resolve_model_dir
    from qdpo_core.prompts import builtin_prompts
    from qdpo_core.quantize import load_quantized
    from qdpo_core.tokens import collate, sequence_logps

    info = machine()
    model_dir = resolve_model_dir(args.model)
    tokenizer, teacher = load_tokenizer(model_dir), load_full_precision(model_dir, "cpu")
    student, _ = load_quantized(model_dir, QuantSpec(method="rtn", bits=3), "cpu")
    from qdpo_core.tokens import encode_prompt

    prompts = [encode_prompt(tokenizer, r["messages"], 512).ids for r in builtin_prompts("eval")[: args.prompts]]
    answers = [a.ids for a in generate_all(teacher, tokenizer, prompts, Decoding(max_new_tokens=args.max_new_tokens), args.batch_size)]
    held_out = HeldOut(prompts, answers, [""] * len(prompts))
    tokens = sum(len(p) + len(a) for p, a in zip(prompts, answers))
    pad = tokenizer.pad_token_id

    def best_of(run) -> float:
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        return min(times)

    @torch.no_grad()
    def plain_forward(model):
        for start in range(0, len(prompts), args.batch_size):
            batch = collate(prompts[start : start + args.batch_size], answers[start : start + args.batch_size], pad)
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float().log_softmax(-1)

    plain = best_of(lambda: plain_forward(student))
    cache = TeacherCache()
    teacher_forced_metrics(student, teacher, held_out, args.batch_size, pad, cache=cache)  # fills the FP side once per run
    scoring = best_of(lambda: teacher_forced_metrics(student, teacher, held_out, args.batch_size, pad, cache=cache))
    scoring_both = best_of(lambda: teacher_forced_metrics(student, teacher, held_out, args.batch_size, pad))

    @torch.inference_mode()
    def reference_pass():
        for start in range(0, len(prompts), args.batch_size):
            sequence_logps(student, collate(prompts[start : start + args.batch_size], answers[start : start + args.batch_size], pad))

    reference = best_of(reference_pass)
    rows = [
        ("plain batched forward (all positions, data order)", plain, 1),
        ("held-out scoring, FP side cached (every checkpoint)", scoring, 1),
        ("held-out scoring, both models (once per run)", scoring_both, 2),
        ("reference / sequence log-probs", reference, 1),
    ]
    base = tokens / plain
    lines = [
        f"No-grad passes, {args.model} RTN 3-bit student, {len(prompts)} sequences, {tokens} tokens, batch {args.batch_size} ({describe(info)})",
        "",
        "| pass | seconds | tokens/s per model forward | vs plain forward |",
        "|---|---|---|---|",
    ]
    result = []
    for label, seconds, forwards in rows:
        rate = tokens * forwards / seconds
        result.append({"pass": label, "seconds": round(seconds, 2), "tokens_per_second": round(rate, 1), "vs_plain": round(rate / base, 2)})
        lines.append(f"| {label} | {seconds:.2f} | {rate:.0f} | {rate / base:.0%} |")
    worst = min(r["vs_plain"] for r in result[1:])
    lines += ["", f"Goal: every pass at ≥{GOAL:.0%} of the plain forward's tokens/s. {'Met' if worst >= GOAL else 'Not met'} (lowest {worst:.0%})."]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": settings_of(args), "machine": info, "tokens": tokens, "rows": result}, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
