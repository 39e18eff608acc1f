"""FactTune pairs: sample n answers per prompt, score each for factuality, prefer the higher-scored one.

    spec = PipelineSpec.from_dict({"method": "factuality", "factuality": {"scorer": "consistency", "num_samples": 4}})
    run_source(FactualityPairs(), records, PairContext(spec, ...), workdir / "pairs.jsonl")

Scorers (Tian et al. 2023), all given (prompt messages, sampled answers) → one score per answer:
  consistency  FactTune-MC, reference-free: split the answer into claims, blank out each claim's most
               checkable part, ask the labeler to fill the blank `num_questions` times (sampled), and
               score a claim by the share of answers that agree with it; the answer's score is the
               mean over its claims. What the model answers consistently, it is confident about.
  logprob      the cheap proxy: mean per-token log-prob of the answer under the (local) labeler.
  reference    FactTune-FS: share of claims the labeler judges supported ("Yes" vs "No") by the
               best-matching passages of the user's reference JSONL; a claim no passage mentions
               is unsupported.
Every two answers of a prompt whose scores differ by more than `min_score_gap` make a
(higher, lower) pair; the pairs file keeps both scores and the per-claim evidence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qdpo_core.claims import agrees, cloze, split_claims
from qdpo_core.generate import Decoding, Response
from qdpo_core.labelers import Labeler, labeler_for
from qdpo_core.labelers.pairwise import render_conversation
from qdpo_core.pairs.base import PairContext
from qdpo_core.references import PassageIndex, read_references

ANSWER_TOKENS = 12  # a filled-in blank is a few words
SUPPORT_CHOICES = ("Yes", "No")


@dataclass
class Scored:
    score: float | None  # None: nothing in the answer could be scored (e.g. no claims)
    claims: list[dict] = field(default_factory=list)  # per claim: the claim, its score and the evidence
    detail: dict = field(default_factory=dict)


def score_pairs(scores: list[float | None], ids: list[list[int]], min_gap: float) -> list[tuple[int, int, str | None]]:
    """Every pair of answers as (higher, lower, drop reason or None), in a fixed order."""
    out: list[tuple[int, int, str | None]] = []
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            score_i, score_j = scores[i], scores[j]
            if ids[i] == ids[j]:
                out.append((i, j, "identical"))
            elif score_i is None or score_j is None:
                out.append((i, j, "unscored"))
            else:
                high, low = (i, j) if score_i >= score_j else (j, i)
                out.append((high, low, None if abs(score_i - score_j) > min_gap else "small_score_gap"))
    return out


class LogprobScorer:
    name = "logprob"

    def __init__(self, labeler):
        if not hasattr(labeler, "mean_token_logprobs"):
            raise TypeError("the logprob scorer needs a local labeler")
        self.labeler = labeler

    def score(self, prompts: list[list[dict]], answers: list[Response], seed: int) -> list[Scored]:
        means = self.labeler.mean_token_logprobs(prompts, [a.text for a in answers], [a.finished for a in answers])
        return [Scored(round(m, 6), detail={"mean_logprob": round(m, 6)}) for m in means]


def claim_question(prompt: list[dict], question: str) -> list[dict]:
    # The original request comes first, as if asked anew: even a 135M model then completes
    # "The capital of France is ____" with Paris most of the time, which "fill in the blank" alone did not get.
    text = f"{render_conversation(prompt)}\nComplete this statement with the right word or words, replacing ____:\n{question}"
    return [{"role": "user", "content": text}]


class ConsistencyScorer:
    name = "consistency"

    def __init__(self, labeler: Labeler, num_questions: int, max_claims: int, temperature: float):
        self.labeler, self.num_questions, self.max_claims, self.temperature = labeler, num_questions, max_claims, temperature

    def score(self, prompts: list[list[dict]], answers: list[Response], seed: int) -> list[Scored]:
        # (answer index, claim, cloze) for every checkable claim; each question is asked num_questions times
        asked = []
        for k, answer in enumerate(answers):
            for claim in split_claims(answer.text, self.max_claims, answer.finished):
                blank = cloze(claim)
                if blank is not None:
                    asked.append((k, claim, blank))
        conversations = [claim_question(prompts[k], blank.question) for k, _, blank in asked for _ in range(self.num_questions)]
        replies = self.labeler.reply(conversations, max_tokens=ANSWER_TOKENS, temperature=self.temperature, seed=seed)
        claims: list[list[dict]] = [[] for _ in answers]
        for number, (k, claim, blank) in enumerate(asked):
            sampled = replies[number * self.num_questions : (number + 1) * self.num_questions]
            agreeing = sum(agrees(reply, blank.answer) for reply in sampled)
            claims[k].append({"claim": claim, "question": blank.question, "expected": blank.answer, "answers": sampled, "score": agreeing / len(sampled)})
        return [Scored(_mean([c["score"] for c in found]), found) for found in claims]


def support_question(prompt: list[dict], claim: str, passages: list[dict]) -> list[dict]:
    shown = "\n\n".join((f"[{p['title']}] " if p.get("title") else "") + p["text"] for p in passages)
    text = (
        f"Reference passages:\n{shown}\n\n"
        f'Context: the statement below comes from an answer to "{render_conversation(prompt)}".\n'
        f"Statement: {claim}\n\n"
        "Is the statement supported by the reference passages? Answer Yes or No."
    )
    return [{"role": "user", "content": text}]


class ReferenceScorer:
    name = "reference"

    def __init__(self, labeler: Labeler, passages: list[dict], max_claims: int, passages_per_claim: int):
        self.labeler, self.index = labeler, PassageIndex(passages)
        self.max_claims, self.passages_per_claim = max_claims, passages_per_claim

    def score(self, prompts: list[list[dict]], answers: list[Response], seed: int) -> list[Scored]:
        claims: list[list[dict]] = [[] for _ in answers]
        to_ask, conversations = [], []
        for k, answer in enumerate(answers):
            for claim in split_claims(answer.text, self.max_claims, answer.finished):
                found = self.index.search(claim, self.passages_per_claim, context=render_conversation(prompts[k]))
                entry = {"claim": claim, "passages": [p.get("id", p.get("title", p["text"][:60])) for p in found], "p_supported": 0.0, "supported": False}
                claims[k].append(entry)
                if found:  # a claim no passage mentions is unsupported without asking
                    to_ask.append(entry)
                    conversations.append(support_question(prompts[k], claim, found))
        for entry, verdict in zip(to_ask, self.labeler.choose(conversations, SUPPORT_CHOICES)):
            entry.update(p_supported=round(verdict.probs[0], 6), supported=verdict.probs[0] > 0.5, label_source=verdict.source)
        return [Scored(_mean([float(c["supported"]) for c in found]), found) for found in claims]


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None


class FactualityPairs:
    name = "factuality"

    def __init__(self):
        self._scorer = None  # built on first use: loads the labeler, reads and checks the references

    def chunk_size(self, ctx: PairContext) -> int:
        # all samples of a chunk's prompts are generated as one batch of about generation.batch_size
        return max(1, ctx.spec.generation.batch_size // ctx.spec.factuality.num_samples)

    def scorer(self, ctx: PairContext):
        if self._scorer is None:
            f = ctx.spec.factuality
            passages = None
            if f.scorer == "reference":  # a bad file fails before any labeler loads
                assert f.references is not None  # FactualitySpec requires it for scorer 'reference'
                passages = read_references(f.references)
            labeler = labeler_for(f.labeler, ctx.models, "factuality.labeler")
            if f.scorer == "logprob":
                self._scorer = LogprobScorer(labeler)
            elif f.scorer == "consistency":
                self._scorer = ConsistencyScorer(labeler, f.num_questions, f.max_claims, f.temperature)
            else:
                assert passages is not None  # scorer 'reference': read above
                self._scorer = ReferenceScorer(labeler, passages, f.max_claims, f.passages_per_claim)
        return self._scorer

    def build_chunk(self, records: list[dict], first_index: int, ctx: PairContext) -> list[dict]:
        f, generation = ctx.spec.factuality, ctx.spec.generation
        scorer = self.scorer(ctx)
        prompt_ids = ctx.encode_prompts(records)
        n = f.num_samples
        responder = (ctx.models.policy or ctx.models.student) if f.response_model == "quantized" else ctx.models.teacher  # quantized: the model being repaired
        decoding = Decoding(max_new_tokens=generation.max_new_tokens, do_sample=True, temperature=f.temperature, top_p=generation.top_p)
        # row r answers prompt r // n: the n samples of a prompt are neighbours
        answers = ctx.answer(responder, [ids for ids in prompt_ids for _ in range(n)], decoding, ctx.spec.seed + first_index)
        scored = scorer.score([r["messages"] for r in records for _ in range(n)], answers, ctx.spec.seed + first_index)
        ctx.stats["responses_scored"] += sum(s.score is not None for s in scored)
        ctx.stats["claims_scored"] += sum(len(s.claims) for s in scored)
        for claim in (c for s in scored for c in s.claims if "label_source" in c):
            ctx.stats[f"labels_{claim['label_source']}"] += 1  # reference scorer: how each support verdict was obtained
        examples = []
        for offset, (record, ids) in enumerate(zip(records, prompt_ids)):
            mine = answers[offset * n : (offset + 1) * n]
            marks = scored[offset * n : (offset + 1) * n]
            for high, low, reason in score_pairs([m.score for m in marks], [a.ids for a in mine], f.min_score_gap):
                example = {"index": first_index + offset, "samples": [high, low], "scores": [marks[high].score, marks[low].score]}
                if reason is not None:
                    example["dropped"] = reason
                else:
                    example.update(self._pair(record, ids, mine[high], mine[low], marks[high], marks[low], scorer.name))
                examples.append(example)
        return examples

    @staticmethod
    def _pair(record: dict, prompt_ids: list[int], chosen: Response, rejected: Response, chosen_mark: Scored, rejected_mark: Scored, scorer: str) -> dict:
        return {
            "messages": record["messages"],
            "prompt_ids": prompt_ids,
            "chosen": chosen.text,
            "chosen_ids": chosen.ids,
            "rejected": rejected.text,
            "rejected_ids": rejected.ids,
            "chosen_finished": chosen.finished,
            "rejected_finished": rejected.finished,
            "scorer": scorer,
            "chosen_score": chosen_mark.score,
            "rejected_score": rejected_mark.score,
            "chosen_claims": chosen_mark.claims,
            "rejected_claims": rejected_mark.claims,
            **({"chosen_detail": chosen_mark.detail, "rejected_detail": rejected_mark.detail} if chosen_mark.detail else {}),
        }
