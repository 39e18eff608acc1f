"""The built-in prompt set (used when a job names no dataset) is well-formed and its split is fixed."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from importlib.resources import files

import pytest

KEYS = {"id", "category", "prompt", "split"}
N_TOTAL, N_TRAIN, N_EVAL = 320, 280, 40


def _lines() -> list[str]:
    text = (files("qdpo_core") / "data" / "builtin_prompts.jsonl").read_text(encoding="utf-8")
    return text.splitlines()


@pytest.fixture(scope="module")
def records() -> list[dict]:
    out = []
    for lineno, line in enumerate(_lines(), start=1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:  # pragma: no cover - failure path
            pytest.fail(f"line {lineno} is not valid JSON: {exc}")
        assert isinstance(rec, dict), f"line {lineno} is not a JSON object"
        out.append(rec)
    return out


def test_every_line_parses_and_no_blank_lines():
    lines = _lines()
    assert len(lines) == N_TOTAL
    for lineno, line in enumerate(lines, start=1):
        assert line.strip(), f"line {lineno} is blank"
        assert isinstance(json.loads(line), dict), f"line {lineno} is not a JSON object"


def test_exactly_the_four_keys(records):
    for rec in records:
        assert set(rec) == KEYS, f"{rec.get('id')}: keys {sorted(rec)}"


def test_ids_unique_and_in_order(records):
    ids = [rec["id"] for rec in records]
    assert len(set(ids)) == len(ids), "duplicate ids"
    assert ids == [f"p{i:04d}" for i in range(1, N_TOTAL + 1)]


def test_prompts_and_categories_are_non_empty_strings(records):
    for rec in records:
        assert isinstance(rec["prompt"], str) and rec["prompt"].strip(), rec["id"]
        assert isinstance(rec["category"], str) and rec["category"].strip(), rec["id"]


def test_split_counts(records):
    counts = Counter(rec["split"] for rec in records)
    assert set(counts) == {"train", "eval"}
    assert counts["train"] == N_TRAIN
    assert counts["eval"] == N_EVAL


def test_split_is_the_fixed_rule(records):
    # eval iff the numeric part of the id is a multiple of 8 -- never change this
    for rec in records:
        expected = "eval" if int(rec["id"][1:]) % 8 == 0 else "train"
        assert rec["split"] == expected, rec["id"]


def test_every_category_has_at_least_two_eval_prompts(records):
    evals: dict[str, int] = defaultdict(int)
    for rec in records:
        evals[rec["category"]] += rec["split"] == "eval"
    for category, n in evals.items():
        assert n >= 2, f"category {category!r} has only {n} eval prompt(s)"


def test_no_duplicate_prompt_texts(records):
    seen: dict[str, str] = {}
    for rec in records:
        key = re.sub(r"\s+", " ", rec["prompt"]).strip().casefold()
        assert key not in seen, f"{rec['id']} duplicates {seen[key]}"
        seen[key] = rec["id"]
