"""What every labeler offers, what it returns, and the errors it raises.

A labeler is a chat model asked two kinds of things:

    labeler.choose(conversations, ("1", "2"))   # how likely the reply starts with each choice
    labeler.reply(conversations, max_tokens=64)  # free text (rationales, answers to claim questions)

`choose` is the soft label of RLAIF: the softmax over the log-probs of the choice tokens. An
endpoint that gives no log-probs still answers; its verdict is parsed from the text instead and
marked `source="parsed"` so a report can say which kind of label it holds.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Protocol

from qdpo_core.errors import QdpoError


class LabelerUnavailable(QdpoError):
    """The labeler cannot be reached or refuses the request (timeouts, connection errors, 4xx/5xx)."""

    code = "labeler_unavailable"


class LabelerBadResponse(QdpoError):
    """The labeler answered, but not with a chat completion (malformed JSON, missing fields)."""

    code = "labeler_bad_response"


@dataclass
class Choice:
    """The labeler's verdict among a few choices for one conversation."""

    probs: list[float]  # one per choice, summing to 1
    source: str  # "logprobs" (soft label), "parsed" (one-hot from the reply text) or "unparsed" (uniform)
    logprobs: list[float] | None = None  # log-prob of each choice's token under the labeler, when known
    text: str | None = None  # the reply a verdict was parsed from

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        out["probs"] = [round(p, 6) for p in self.probs]
        return out


class Labeler(Protocol):
    description: str  # e.g. "local model smollm2-135m-instruct", shown in reports

    def choose(self, conversations: list[list[dict]], choices: tuple[str, ...]) -> list[Choice]:
        """For each conversation (ending with a user turn): how strongly the reply is each choice."""
        ...

    def reply(self, conversations: list[list[dict]], max_tokens: int, temperature: float = 0.0, seed: int = 0) -> list[str]:
        """Free-text replies; temperature 0 = greedy. Sampled replies are reproducible from `seed`."""
        ...


def softmax(logprobs: list[float]) -> list[float]:
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    return [w / total for w in weights]


def from_logprobs(logprobs: list[float]) -> Choice:
    return Choice(probs=softmax(logprobs), source="logprobs", logprobs=[round(lp, 6) for lp in logprobs])


def parse_verdict(text: str, choices: tuple[str, ...]) -> Choice:
    """A verdict from reply text: the first choice standing alone as a word wins ("Response 2 is better" → 2)."""
    pattern = r"(?<!\w)(" + "|".join(re.escape(c) for c in choices) + r")(?!\w)"
    match = re.search(pattern, text, flags=re.IGNORECASE)
    if match is None:
        return Choice(probs=[1.0 / len(choices)] * len(choices), source="unparsed", text=text)
    picked = [c.lower() for c in choices].index(match.group(1).lower())
    return Choice(probs=[float(i == picked) for i in range(len(choices))], source="parsed", text=text)
