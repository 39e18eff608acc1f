"""Atomic claims from an answer, and claims turned into fill-in-the-blank questions (FactTune scoring).

    split_claims("Paris is the capital of France. It has 2.1 million inhabitants; the Seine runs through it.")
    # ['Paris is the capital of France', 'It has 2.1 million inhabitants', 'the Seine runs through it']
    cloze("Paris is the capital of France")   # Cloze(question='Paris is the capital of ____', answer='France')
    agrees("It's France.", "France")          # True

FactTune extracts claims with a large model; rules are used here so scoring needs no model that
can follow such instructions: sentences (abbreviation- and decimal-aware), then clauses joined by
';' or ', and' / ', but' when both halves are long enough to state something. The blank of a cloze
is the claim's most checkable part: its last number, else its last proper name, else its last
content word. Pure text, no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MIN_CLAIM_WORDS = 3
STOPWORDS = frozenset(
    """a an the and or but if then so of in on at to for from by with about as into over under than that this these those
    it its it's is are was were be been being has have had do does did will would can could may might must shall should
    i you he she we they me him her us them my your his our their what which who whom whose when where why how not no
    there here also very just more most some any all each such only own same other too out up down off again once""".split()
)
_ABBREVIATIONS = frozenset("e.g i.e etc dr mr mrs ms st vs jr sr no inc ltd prof fig approx mt ca cf al".split())
_SENTENCE_END = re.compile(r"([.!?]+)[\"')\]]*\s+")
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")
_CLAUSE_BREAK = re.compile(r";\s+|,\s+(?:and|but|while|whereas)\s+")
_WORD = re.compile(r"\d+(?:[.,:]\d+)*%?|[\w'-]+", re.UNICODE)  # numbers keep their decimals ("2.1", "10:30")
BLANK = "____"


def sentences(text: str) -> list[str]:
    """Sentences of `text`; list items and lines count as sentences of their own."""
    out = []
    for line in text.splitlines():
        line = _BULLET.sub("", line).strip()
        start = 0
        for match in _SENTENCE_END.finditer(line):
            before = line[start : match.start()].split()
            last_word = before[-1].lower().rstrip(".") if before else ""
            if match.group(1) == "." and (last_word in _ABBREVIATIONS or (len(last_word) == 1 and last_word.isalpha())):
                continue  # "e.g. Rome", "J. K. Rowling": not a sentence end
            out.append(line[start : match.end()].strip())
            start = match.end()
        if line[start:].strip():
            out.append(line[start:].strip())
    return out


def split_claims(text: str, max_claims: int | None = None, finished: bool = True) -> list[str]:
    """Atomic-ish claims, in order, without duplicates, questions or fragments shorter than MIN_CLAIM_WORDS.

    An answer cut off by the token limit (`finished=False`) loses its last sentence when that one
    has no end mark: "The capital of France is" states nothing yet.
    """
    claims, seen = [], set()
    parts = sentences(text)
    if not finished and parts and not parts[-1].rstrip("\"')]").endswith((".", "!", "?")):
        parts = parts[:-1]
    for sentence in parts:
        if sentence.rstrip("\"')]").endswith("?"):
            continue  # a question asks, it does not claim
        for clause in _clauses(sentence.rstrip(" .!;:\"')]").lstrip("\"'(["), MIN_CLAIM_WORDS):
            key = clause.lower()
            if len(_WORD.findall(clause)) >= MIN_CLAIM_WORDS and key not in seen:
                seen.add(key)
                claims.append(clause)
    return claims[:max_claims] if max_claims is not None else claims


def _clauses(sentence: str, min_words: int) -> list[str]:
    """Split at clause breaks only where both sides keep at least `min_words` words."""
    pieces, start = [], 0
    for match in _CLAUSE_BREAK.finditer(sentence):
        left, right = sentence[start : match.start()], sentence[match.end() :]
        if len(_WORD.findall(left)) >= min_words and len(_WORD.findall(right)) >= min_words:
            pieces.append(left.strip(" ,"))
            start = match.end()
    pieces.append(sentence[start:].strip(" ,"))
    return [p for p in pieces if p]


@dataclass(frozen=True)
class Cloze:
    question: str  # the claim with its blank as BLANK
    answer: str  # what the claim put in the blank


def cloze(claim: str) -> Cloze | None:
    """The claim with its most checkable span blanked out, or None when nothing in it is checkable."""
    words = list(_WORD.finditer(claim))
    span = _last_number(words) or _last_proper_name(words) or _last_content_word(words)
    if span is None:
        return None
    start, end = span
    return Cloze(question=claim[:start] + BLANK + claim[end:], answer=claim[start:end])


def _last_number(words: list[re.Match]) -> tuple[int, int] | None:
    for word in reversed(words):
        if any(ch.isdigit() for ch in word.group()):
            return word.span()
    return None


def _last_proper_name(words: list[re.Match]) -> tuple[int, int] | None:
    """The last run of capitalised words that does not open the claim ("New York", "Marie Curie")."""
    end_index = None
    for i in range(len(words) - 1, 0, -1):
        if words[i].group()[0].isupper() and words[i].group().lower() not in STOPWORDS:
            end_index = i
            break
    if end_index is None:
        return None
    start_index = end_index
    while start_index - 1 >= 1 and words[start_index - 1].group()[0].isupper():
        start_index -= 1
    return words[start_index].start(), words[end_index].end()


def _last_content_word(words: list[re.Match]) -> tuple[int, int] | None:
    for word in reversed(words[1:]):  # the subject opening the claim is what the question is about
        text = word.group().lower()
        if len(text) >= 4 and text.isalpha() and text not in STOPWORDS:
            return word.span()
    return None


def normalize(text: str) -> list[str]:
    """Lower-cased words without articles or punctuation; digit groups joined ("1,000" → "1000")."""
    text = re.sub(r"(?<=\d)[,_](?=\d)", "", text.lower())
    return [w.strip("'-") for w in _WORD.findall(text) if w not in ("a", "an", "the") and w.strip("'-")]


def agrees(answer: str, expected: str, max_answer_words: int = 12) -> bool:
    """Does a short answer contain every word of the expected span (within its first words)?"""
    wanted = normalize(expected)
    given = set(normalize(answer)[:max_answer_words])
    return bool(wanted) and all(w in given for w in wanted)
