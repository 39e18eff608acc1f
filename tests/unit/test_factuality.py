"""FactTune: claim splitting, blanks, agreement, the three scorers, pair selection and reference validation."""

import json

import pytest
import torch
from chat_server import create_app, serve

from qdpo_core.claims import agrees, cloze, split_claims
from qdpo_core.config import LabelerSpec, PipelineSpec
from qdpo_core.errors import DataError, SpecError
from qdpo_core.events import Emitter
from qdpo_core.generate import Response
from qdpo_core.holder import ModelHolder
from qdpo_core.labelers.local import LocalLabeler
from qdpo_core.labelers.openai_api import OpenAILabeler
from qdpo_core.pairs.base import PairContext, run_source
from qdpo_core.pairs.factuality import ConsistencyScorer, FactualityPairs, ReferenceScorer, score_pairs
from qdpo_core.prompts import builtin_prompts
from qdpo_core.references import PassageIndex, parse_reference_lines


def test_answers_split_into_sentence_and_clause_claims():
    text = (
        "Marie Curie was born in Warsaw in 1867. She won the Nobel Prize in Physics in 1903, and she won it again in 1911; "
        "her husband was Pierre Curie. Was she the first woman to win? Dr. Smith, e.g. her student, wrote 2.5 books.\n"
        "- Radium glows in the dark\n2. Polonium is named after Poland!\nOk."
    )
    assert split_claims(text) == [
        "Marie Curie was born in Warsaw in 1867",
        "She won the Nobel Prize in Physics in 1903",
        "she won it again in 1911",
        "her husband was Pierre Curie",
        "Dr. Smith, e.g. her student, wrote 2.5 books",
        "Radium glows in the dark",
        "Polonium is named after Poland",
    ]
    assert split_claims(text, max_claims=2) == ["Marie Curie was born in Warsaw in 1867", "She won the Nobel Prize in Physics in 1903"]
    # a short tail after ", and" stays with its clause; duplicates count once
    assert split_claims("Bread is made of flour, and water. Bread is made of flour, and water.") == ["Bread is made of flour, and water"]
    assert split_claims("Sure! Hello.") == []
    # an answer cut by the token limit: its unfinished last sentence is no claim
    cut = "Paris is the capital of France. The river that runs through it is"
    assert split_claims(cut, finished=False) == ["Paris is the capital of France"]
    assert split_claims(cut, finished=True) == ["Paris is the capital of France", "The river that runs through it is"]
    assert split_claims("Paris is the capital of France.\nIt lies on the", finished=False) == ["Paris is the capital of France"]


@pytest.mark.parametrize(
    "claim, question, answer",
    [
        ("Marie Curie was born in Warsaw in 1867", "Marie Curie was born in Warsaw in ____", "1867"),  # a number first
        ("The Eiffel Tower is in Paris", "The Eiffel Tower is in ____", "Paris"),  # else the last proper name
        ("Jupiter is larger than New York City", "Jupiter is larger than ____", "New York City"),  # whole names
        ("water boils when heated enough", "water boils when heated ____", "enough"),  # else the last content word
    ],
)
def test_claims_become_fill_in_the_blank_questions(claim, question, answer):
    blank = cloze(claim)
    assert (blank.question, blank.answer) == (question, answer)


def test_no_blank_when_nothing_is_checkable():
    assert cloze("it is what it is") is None


def test_answers_agree_when_they_contain_the_blanked_words():
    assert agrees("It was Warsaw.", "Warsaw")
    assert agrees("the year 1,867", "1867") and not agrees("1868", "1867")
    assert agrees("in New York City, USA", "New York City") and not agrees("York", "New York City")
    assert not agrees("", "Paris")


def test_every_pair_with_a_large_enough_gap_becomes_higher_over_lower():
    scores = [0.9, 0.5, 0.55, None, 0.9]
    ids = [[1], [2], [3], [4], [1]]  # answer 4 repeats answer 0
    outcome = {(high, low): reason for high, low, reason in score_pairs(scores, ids, min_gap=0.1)}
    assert outcome == {
        (0, 1): None,
        (0, 2): None,
        (0, 3): "unscored",
        (0, 4): "identical",
        (2, 1): "small_score_gap",
        (1, 3): "unscored",
        (4, 1): None,
        (2, 3): "unscored",
        (4, 2): None,
        (3, 4): "unscored",
    }


def _answers(*texts):
    return [Response([i + 10, 2], text, True) for i, text in enumerate(texts)]


QUESTION = [{"role": "user", "content": "Tell me about Paris."}]


def test_consistency_scores_claims_by_how_often_the_re_asked_blank_comes_back():
    # the labeler here is a rule server that fills every blank with "Paris"
    with serve(create_app(mode="rule", blank_answer="Paris, of course")) as base_url:
        labeler = OpenAILabeler(LabelerSpec(kind="openai", base_url=base_url, model="rules"), "factuality.labeler")
        scored = ConsistencyScorer(labeler, num_questions=2, max_claims=3, temperature=1.0).score(
            [QUESTION] * 3,
            _answers("The capital of France is Paris. Its river is called Seine.", "The capital of France is Lyon.", "Hello!"),
            seed=0,
        )
    first, second, third = scored
    assert [c["score"] for c in first.claims] == [1.0, 0.0] and first.score == 0.5
    assert first.claims[0]["question"] == "The capital of France is ____" and first.claims[0]["answers"] == ["Paris, of course"] * 2
    assert second.score == 0.0 and third.score is None and third.claims == []


def test_reference_score_is_the_share_of_claims_the_passages_support():
    passages = parse_reference_lines(
        [
            json.dumps({"title": "Paris", "text": "Paris is the capital of France and lies on the Seine."}),
            json.dumps({"id": "moon", "text": "The Moon orbits the Earth."}),
        ]
    )
    index = PassageIndex(passages)
    assert index.search("the capital of France", k=1) == [passages[0]]
    assert index.search("quantum chromodynamics", k=2) == []
    with serve(create_app(mode="rule")) as base_url:  # says Yes when every word of the claim is in the passages
        labeler = OpenAILabeler(LabelerSpec(kind="openai", base_url=base_url, model="rules"), "factuality.labeler")
        [scored] = ReferenceScorer(labeler, passages, max_claims=4, passages_per_claim=2).score(
            [[{"role": "user", "content": "Share three facts."}]],
            _answers("Paris is the capital of France. The Moon is made of cheese. Gluons bind quarks together."),
            seed=0,
        )
    supported = {c["claim"]: c["supported"] for c in scored.claims}
    assert supported == {"Paris is the capital of France": True, "The Moon is made of cheese": False, "Gluons bind quarks together": False}
    assert scored.score == pytest.approx(1 / 3)
    gluons = scored.claims[2]
    assert gluons["passages"] == [] and "label_source" not in gluons  # nothing to check it against: not asked
    assert scored.claims[0]["label_source"] == "parsed" and scored.claims[0]["passages"][0] == "Paris"


def test_malformed_references_are_listed_by_line():
    lines = ['{"text": "fine"}', "", '{"title": "no text"}', "not json", '{"text": "x", "url": "y"}', '{"text": "  "}']
    with pytest.raises(DataError) as info:
        parse_reference_lines(lines)
    assert info.value.param == "factuality.references"
    assert [(e["line"], e["field"]) for e in info.value.lines] == [(3, "text"), (4, None), (5, "url"), (6, "text")]
    assert info.value.message.startswith("factuality.references: line 3: field 'text' is missing")
    with pytest.raises(DataError, match="factuality.references: the file holds no records"):
        parse_reference_lines(["", "  "])


def test_logprob_scorer_needs_a_local_labeler():
    with pytest.raises(SpecError) as info:
        PipelineSpec.from_dict({"method": "factuality", "factuality": {"scorer": "logprob", "labeler": {"kind": "openai", "base_url": "http://x/v1"}}})
    assert info.value.param == "factuality.labeler.kind"


def _spec(tiny_model_dir, **factuality):
    return PipelineSpec.from_dict(
        {
            "method": "factuality",
            "model": {"name": str(tiny_model_dir)},
            "quantization": {"method": "rtn", "bits": 4},
            "generation": {"max_new_tokens": 6, "batch_size": 6},
            "factuality": {"num_samples": 3, "labeler": {"model": str(tiny_model_dir)}, **factuality},
        }
    )


def _ctx(spec, tokenizer, workdir):
    return PairContext(spec, tokenizer, ModelHolder(spec), Emitter(None), workdir)


def test_logprob_pairs_on_the_tiny_model_keep_scores_and_respect_the_gap(tiny_model_dir, tokenizer, tmp_path):
    spec = _spec(tiny_model_dir, scorer="logprob", min_score_gap=0.05)
    ctx = _ctx(spec, tokenizer, tmp_path)
    summary = run_source(FactualityPairs(), builtin_prompts("train")[:4], ctx, tmp_path / "pairs.jsonl")
    kept = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert summary["responses_generated"] == 12 and summary["responses_scored"] == 12
    dropped = sum(v for k, v in summary.items() if k.startswith("dropped_"))
    assert summary["examples"] == len(kept) >= 1 and summary["examples"] + dropped == 4 * 3  # every pair of 3 answers
    for example in kept:
        assert example["scorer"] == "logprob"
        assert example["chosen_score"] - example["rejected_score"] > 0.05
        assert example["chosen_detail"]["mean_logprob"] == example["chosen_score"]
    # the score is the mean log-prob per answer token under the labeler, computed here with plain transformers
    example = kept[0]
    prompt = tokenizer.apply_chat_template(example["messages"], add_generation_prompt=True, return_dict=True)["input_ids"]
    answer = tokenizer(example["chosen"], add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if example["chosen_finished"] else [])
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logps = torch.log_softmax(ctx.models.teacher(input_ids=ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    mean = logps[torch.arange(len(targets)), targets][len(prompt) - 1 :].mean()
    assert example["chosen_score"] == pytest.approx(float(mean), abs=1e-4)


def test_consistency_with_a_local_labeler_samples_each_question_reproducibly(tiny_model_dir, tokenizer):
    from qdpo_core.models import load_full_precision

    labeler = LocalLabeler(load_full_precision(tiny_model_dir, "cpu"), tokenizer, "tiny", batch_size=4)
    scorer = ConsistencyScorer(labeler, num_questions=3, max_claims=2, temperature=1.0)
    answers = _answers("Paris is the capital of France. It has 2.1 million inhabitants. The Seine runs through it.", "Lyon is the capital of France.")
    first = scorer.score([QUESTION] * 2, answers, seed=5)
    again = scorer.score([QUESTION] * 2, answers, seed=5)
    assert [c["claim"] for c in first[0].claims] == ["Paris is the capital of France", "It has 2.1 million inhabitants"]  # max_claims=2
    assert [c["expected"] for c in first[0].claims] == ["France", "2.1"]
    for scored in first:
        for claim in scored.claims:
            assert len(claim["answers"]) == 3 and claim["score"] == sum(agrees(a, claim["expected"]) for a in claim["answers"]) / 3
        assert scored.score == pytest.approx(sum(c["score"] for c in scored.claims) / len(scored.claims))
    assert [s.claims for s in again] == [s.claims for s in first]  # same seed, same sampled answers
    sampled = first[0].claims[0]["answers"]
    assert len(set(sampled)) > 1  # answers to one question are sampled, not repeated greedy copies


def test_bad_reference_file_fails_before_any_model_is_loaded(tiny_model_dir, tokenizer, tmp_path):
    references = tmp_path / "refs.jsonl"
    references.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    spec = _spec(tiny_model_dir, scorer="reference", references=str(references))
    ctx = _ctx(spec, tokenizer, tmp_path)
    with pytest.raises(DataError) as info:
        run_source(FactualityPairs(), builtin_prompts("train")[:2], ctx, tmp_path / "pairs.jsonl")
    assert info.value.lines[0]["line"] == 2 and info.value.lines[0]["field"] == "txt"
    assert ctx.models._teacher is None and ctx.models._student is None
