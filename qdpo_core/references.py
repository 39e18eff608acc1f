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

import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from qdpo_core.claims import STOPWORDS, normalize
from qdpo_core.datasets import parse_lines, read_jsonl

PARAM = "factuality.references"


def parse_reference_lines(lines: Iterable[str | bytes]) -> list[dict]:
    return parse_lines(lines, "references", param=PARAM)


def read_references(path: str | Path) -> list[dict]:
    return read_jsonl(path, "references", param=PARAM)


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
