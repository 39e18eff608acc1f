"""Which of two answers is better, asked of a labeler in both orders (RLAIF labels and the eval judge).

    comparisons = compare(labeler, [(messages, answer_a, answer_b)], chain_of_thought=False)
    comparisons[0].p_first   # P(answer_a is better), averaged over "a shown first" and "b shown first"

Labelers prefer one position (often the first) whatever the content. Asking twice with the order
swapped and averaging P(a better) from both asks cancels a constant position bias, and makes the
result antisymmetric: compare(a, b).p_first == 1 − compare(b, a).p_first.
"""

from __future__ import annotations

from dataclasses import dataclass

from qdpo_core.labelers.base import Choice, Labeler

CHOICES = ("1", "2")

_TASK = (
    "You compare two answers by AI assistants to the same conversation. A better answer is more "
    "helpful, more accurate and more relevant to what the user asked, without needless length."
)
_ASK_VERDICT = "Which response is better? Answer with a single number, 1 or 2."
_ASK_RATIONALE = "Explain in two or three sentences which response is better and why. Do not give a final verdict yet."


def render_conversation(messages: list[dict]) -> str:
    """The conversation being answered, as plain text inside the labeler's prompt."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def comparison_prompt(messages: list[dict], first: str, second: str, ask: str = _ASK_VERDICT) -> list[dict]:
    text = f"{_TASK}\n\n[Conversation]\n{render_conversation(messages)}\n\n[Response 1]\n{first}\n\n[Response 2]\n{second}\n\n{ask}"
    return [{"role": "user", "content": text}]


def swap_average(forward: list[float], swapped: list[float]) -> float:
    """P(a better) from the forward ask (a shown as Response 1) and the swapped ask (b shown as Response 1).

    forward, swapped: probabilities over ("1", "2").
    """
    return 0.5 * (forward[0] + swapped[1])


@dataclass
class Comparison:
    p_first: float  # P(the first answer given is better), swap-averaged
    forward: Choice  # verdict with the first answer shown as Response 1
    swapped: Choice  # verdict with the second answer shown as Response 1
    rationales: tuple[str, str] | None = None  # (forward, swapped) when chain of thought was asked for

    @property
    def sources(self) -> tuple[str, str]:
        return self.forward.source, self.swapped.source

    def to_dict(self) -> dict:
        out = {"p_first": round(self.p_first, 6), "forward": self.forward.to_dict(), "swapped": self.swapped.to_dict()}
        if self.rationales is not None:
            out["rationales"] = list(self.rationales)
        return out


def compare(labeler: Labeler, items: list[tuple[list[dict], str, str]], chain_of_thought: bool = False, rationale_tokens: int = 64) -> list[Comparison]:
    """Swap-averaged comparisons of (messages, a, b) items; all asks go to the labeler as one batch."""
    # conversation 2k asks with a first, 2k+1 with b first
    asks = []
    for messages, a, b in items:
        asks.append((messages, a, b))
        asks.append((messages, b, a))
    rationales: list[str] | None = None
    if chain_of_thought:
        # the labeler first writes its reasoning, then is asked for the verdict in a second turn
        openers = [comparison_prompt(m, x, y, _ASK_RATIONALE) for m, x, y in asks]
        rationales = labeler.reply(openers, max_tokens=rationale_tokens)
        conversations = [
            opener + [{"role": "assistant", "content": why or "(no rationale)"}, {"role": "user", "content": _ASK_VERDICT}]
            for opener, why in zip(openers, rationales)
        ]
    else:
        conversations = [comparison_prompt(m, x, y) for m, x, y in asks]
    verdicts = labeler.choose(conversations, CHOICES)
    results = []
    for k in range(len(items)):
        forward, swapped = verdicts[2 * k], verdicts[2 * k + 1]
        why = (rationales[2 * k], rationales[2 * k + 1]) if rationales is not None else None
        results.append(Comparison(swap_average(forward.probs, swapped.probs), forward, swapped, why))
    return results
