"""Greedy generation throughput: transformers' generate (one prompt at a time, and batched) vs ours.

    python bench/generate_throughput.py                       # 32 built-in eval prompts, 64 new tokens
    python bench/generate_throughput.py --prompts 16 --max-new-tokens 32 --batch-sizes 8,16

All three decode the same prompts with the same model and must give the same greedy answers
(the script checks it and says so). Prints a table of generated tokens per second and writes
bench/results/generate_throughput.json with the machine it ran on. Each batched generator runs
--repeats times, HF's and ours taking turns, and the median run is shown: on a shared machine one
run can be 20% slower than the next.
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


def median_of(runs: list[dict]) -> dict:
    """The run with the median time, with every run's seconds beside it."""
    row = dict(sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2])
    row["seconds_of_every_run"] = [r["seconds"] for r in runs]
    if any(r["answers"] != row["answers"] for r in runs):
        raise SystemExit(f"{row['label']}: the answers differ from run to run")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="8,16,32", help="batch sizes for the batched runs (HF's and ours)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each batched generator, HF's and ours taking turns; the median is shown")
    parser.add_argument("--out", default=str(HERE / "results" / "generate_throughput.json"))
    args = parser.parse_args(argv)

    from qdpo_core.generate import Decoding, generate_all, hf_generate
    from qdpo_core.models import load_full_precision, load_tokenizer, resolve_model_dir
    from qdpo_core.prompts import builtin_prompts
    from qdpo_core.tokens import encode_prompt

    info = machine()
    model_dir = resolve_model_dir(args.model)
    tokenizer, model = load_tokenizer(model_dir), load_full_precision(model_dir, "cpu")
    prompts = [encode_prompt(tokenizer, r["messages"], 512).ids for r in builtin_prompts("eval")[: args.prompts]]
    decoding = Decoding(max_new_tokens=args.max_new_tokens)
    generate_all(model, tokenizer, prompts[:2], decoding, 2)  # warm-up

    def timed(label: str, run) -> dict:
        started = time.perf_counter()
        answers = run()
        seconds = time.perf_counter() - started
        tokens = sum(len(a.ids) for a in answers)
        print(f"  {label}: {tokens} tokens in {seconds:.1f} s", flush=True)
        return {
            "label": label,
            "seconds": round(seconds, 2),
            "tokens": tokens,
            "tokens_per_second": round(tokens / seconds, 1),
            "answers": [a.ids for a in answers],
        }

    rows = [timed("transformers generate, one prompt at a time", lambda: [hf_generate(model, tokenizer, [p], decoding)[0] for p in prompts])]
    for size in [int(x) for x in args.batch_sizes.split(",")]:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # the same length-sorted batches for both

        def hf_batched(size=size, order=order):
            results = [None] * len(prompts)
            for start in range(0, len(order), size):
                chunk = order[start : start + size]
                for i, answer in zip(chunk, hf_generate(model, tokenizer, [prompts[i] for i in chunk], decoding)):
                    results[i] = answer
            return results

        ours = lambda size=size: generate_all(model, tokenizer, prompts, decoding, size)  # noqa: E731
        runs: dict[str, list[dict]] = {f"transformers generate, batches of {size}": [], f"qdpo greedy loop, batches of {size}": []}
        for _ in range(args.repeats):  # taking turns, so a slower spell of a shared machine hits both alike
            for (label, measured), run in zip(runs.items(), (hf_batched, ours)):
                measured.append(timed(label, run))
        rows.extend(median_of(measured) for measured in runs.values())
    reference = rows[0]["answers"]
    for row in rows:
        row["same_answers_as_unbatched"] = sum(a == b for a, b in zip(row.pop("answers"), reference))
    base = rows[0]["tokens_per_second"]
    lines = [
        f"Greedy generation, {args.model}, {len(prompts)} prompts, up to {args.max_new_tokens} new tokens, batched rows the median of {args.repeats} runs ({describe(info)})",
        "",
        "| generator | tokens/s | vs one at a time | vs HF batched (same batch) | same answers |",
        "|---|---|---|---|---|",
    ]
    for i, row in enumerate(rows):
        hf_same_batch = rows[i - 1]["tokens_per_second"] if row["label"].startswith("qdpo") else None
        versus_hf = f"{row['tokens_per_second'] / hf_same_batch:.2f}×" if hf_same_batch else ""
        lines.append(
            f"| {row['label']} | {row['tokens_per_second']} | {row['tokens_per_second'] / base:.2f}× | {versus_hf} | {row['same_answers_as_unbatched']}/{len(prompts)} |"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": settings_of(args), "machine": info, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
