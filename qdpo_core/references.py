"""Reference passages for FactTune's reference-based scorer: validated JSONL in, lexical search out.

    passages = read_references("wiki.jsonl")   # {"text": str, "title"?: str, "id"?, "metadata"?} per line
    index = PassageIndex(passages)
    index.search("Marie Curie won two Nobel Prizes", k=2)   # best-matching passages, best first

Validation follows `qdpo_core.datasets`: every bad line is listed (line number, field, message) in
one `DataError`, nothing is half-read. Search is IDF-weighted word overlap: it only has to bring
the passage about a claim's subject in front of the labeler, which then judges support.
No torch here, so the API can validate an upload with it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qdpo_core.claims import STOPWORDS, normalize
from qdpo_core.errors import DataError

PARAM = "factuality.references"
MAX_LISTED_ERRORS = 50
_FIELDS = {"text", "title", "id", "metadata"}


def _check_record(record: Any) -> tuple[str | None, str] | dict:
    """The passage, or (field, message) saying what is wrong with it."""
    if not isinstance(record, dict):
        return None, "each line must be a JSON object with a 'text' field"
    for key in record:
        if key not in _FIELDS:
            return key, "is not a known field (a passage has 'text' and optionally 'title', 'id', 'metadata')"
    if not isinstance(record.get("text"), str) or not record["text"].strip():
        return "text", "must be a non-empty string" if "text" in record else "is missing (each passage needs 'text')"
    if "title" in record and not isinstance(record["title"], str):
        return "title", "must be a string"
    return {k: record[k] for k in ("text", "title", "id", "metadata") if k in record}


def parse_reference_lines(lines: Iterable[str | bytes]) -> list[dict]:
    passages: list[dict] = []
    errors: list[dict] = []
    for number, raw in enumerate(lines, start=1):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                errors.append({"line": number, "field": None, "message": "is not valid UTF-8"})
                continue
        text = raw.lstrip("\ufeff").strip()
        if not text:
            continue
        try:
            checked = _check_record(json.loads(text))
        except json.JSONDecodeError as exc:
            errors.append({"line": number, "field": None, "message": f"is not valid JSON ({exc.msg} at column {exc.colno})"})
            continue
        if isinstance(checked, tuple):
            errors.append({"line": number, "field": checked[0], "message": checked[1]})
        else:
            passages.append(checked)
    if errors:
        first = errors[0]
        where = f"{PARAM}: line {first['line']}: " + (f"field '{first['field']}' " if first["field"] else "")
        more = f" ({len(errors)} bad lines in all; nothing was read)" if len(errors) > 1 else " (nothing was read)"
        raise DataError(where + first["message"] + more, param=PARAM, lines=errors[:MAX_LISTED_ERRORS])
    if not passages:
        raise DataError(f"{PARAM}: the file holds no passages; give at least one {{\"text\": ...}} line", param=PARAM)
    return passages


def read_references(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{PARAM}: file {path.name} not found", param=PARAM)
    with path.open("rb") as handle:
        return parse_reference_lines(handle)


def content_words(text: str) -> set[str]:
    return {w for w in normalize(text) if w not in STOPWORDS and len(w) > 1}


class PassageIndex:
    def __init__(self, passages: list[dict]):
        self.passages = passages
        self._words = [content_words(p.get("title", "") + " " + p["text"]) for p in passages]
        document_frequency = Counter(w for words in self._words for w in words)
        n = len(passages)
        self._idf = {w: math.log(1 + n / df) for w, df in document_frequency.items()}

    def search(self, query: str, k: int, context: str = "") -> list[dict]:
        """Up to k passages sharing words with `query` (words only in `context`, e.g. the user's question, count half)."""
        wanted = {w: 1.0 for w in content_words(query)}
        for w in content_words(context):
            wanted.setdefault(w, 0.5)
        scored = []
        for i, words in enumerate(self._words):
            score = sum(weight * self._idf[w] for w, weight in wanted.items() if w in words)
            if score > 0:
                scored.append((score, -i))  # ties: the earlier passage first
        return [self.passages[-i] for _, i in sorted(scored, reverse=True)[:k]]
