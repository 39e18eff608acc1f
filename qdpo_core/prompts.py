"""The project's own prompt set: 320 chat prompts over 16 categories with a fixed train/eval split.

Used when a job names no dataset. The split never changes, so results on the built-in eval split
are comparable across jobs, methods and releases.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

SPLITS = ("train", "eval")


@lru_cache(maxsize=1)
def _all() -> tuple[dict, ...]:
    text = (resources.files("qdpo_core") / "data" / "builtin_prompts.jsonl").read_text(encoding="utf-8")
    return tuple(json.loads(line) for line in text.splitlines() if line.strip())


def builtin_prompts(split: str) -> list[dict]:
    """Records in the pipeline's prompt shape: {"id", "messages", "metadata": {"category"}}."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    return [
        {"id": row["id"], "messages": [{"role": "user", "content": row["prompt"]}], "metadata": {"category": row["category"]}}
        for row in _all()
        if row["split"] == split
    ]
