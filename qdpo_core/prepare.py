"""Stage 1: read and validate the job's data, split it, and write data/train.jsonl, data/eval.jsonl.

Everything a user can get wrong about data is found here, before any model is loaded.
"""

from __future__ import annotations

import random
from pathlib import Path

from qdpo_core.config import PipelineSpec
from qdpo_core.datasets import read_jsonl, write_jsonl
from qdpo_core.errors import DataError
from qdpo_core.prompts import builtin_prompts
from qdpo_core.references import read_references


def _subset(records: list[dict], limit: int | None, seed: int) -> list[dict]:
    if limit is None or len(records) <= limit:
        return records
    chosen = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in chosen]


def _split(records: list[dict], fraction: float, seed: int, what: str) -> tuple[list[dict], list[dict]]:
    if len(records) < 2:
        raise DataError(
            f"dataset: {what} has {len(records)} record; at least 2 are needed (one to train on, one held out to evaluate), or give eval_prompts",
            param="dataset",
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = min(max(1, round(fraction * len(records))), len(records) - 1)
    eval_idx = set(order[:held])
    return [r for i, r in enumerate(records) if i not in eval_idx], [r for i, r in enumerate(records) if i in eval_idx]


def prepare_data(spec: PipelineSpec) -> tuple[list[dict], list[dict], dict]:
    """→ (train records, eval prompt records, summary)."""
    data = spec.dataset
    if spec.method == "dpo":
        assert data.pairs is not None  # PipelineSpec requires it for method dpo
        train = read_jsonl(data.pairs, "preferences")
        source = "preferences file"
    elif data.prompts:
        train = read_jsonl(data.prompts, "prompts")
        source = "prompts file"
    else:
        train = builtin_prompts("train")
        source = "built-in prompts"
    if data.eval_prompts:
        held_out = read_jsonl(data.eval_prompts, "prompts")
    elif source == "built-in prompts":
        held_out = builtin_prompts("eval")
    else:
        train, held_out = _split(train, data.eval_fraction, spec.seed, source)
    held_out = [{k: v for k, v in r.items() if k in ("id", "messages", "metadata")} for r in held_out]
    train = _subset(train, data.max_train_prompts, spec.seed)
    held_out = _subset(held_out, data.max_eval_prompts, spec.seed + 1)
    summary = {"source": source, "train_records": len(train), "eval_prompts": len(held_out)}
    if spec.method == "factuality" and spec.factuality.scorer == "reference":
        assert spec.factuality.references is not None  # FactualitySpec requires it for scorer 'reference'
        summary["reference_passages"] = len(read_references(spec.factuality.references))  # a bad file fails now, not mid-job
    return train, held_out, summary


def write_prepared(workdir: Path, train: list[dict], held_out: list[dict]) -> None:
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    write_jsonl(workdir / "data" / "train.jsonl", train)
    write_jsonl(workdir / "data" / "eval.jsonl", held_out)
