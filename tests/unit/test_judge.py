"""Judged win-rate: order-swapped outcomes, ties, the Wilson interval, and the report of a pipeline run."""

import json

import pytest
from chat_server import create_app, serve

from qdpo_core.config import LabelerSpec, PipelineSpec
from qdpo_core.judge import judge_answers, outcome, wilson_interval
from qdpo_core.labelers.openai_api import OpenAILabeler
from qdpo_core.pipeline import run_pipeline


@pytest.mark.parametrize(
    "forward, swapped, expected",
    [
        ([0.9, 0.1], [0.2, 0.8], "win"),  # aligned preferred as Response 1 and as Response 2
        ([0.3, 0.7], [0.6, 0.4], "loss"),
        ([0.9, 0.1], [0.9, 0.1], "tie"),  # "1" both times: pure position bias, no preference
        ([0.5, 0.5], [0.2, 0.8], "tie"),  # undecided in one order
    ],
)
def test_an_answer_wins_only_when_both_orders_prefer_it(forward, swapped, expected):
    assert outcome(forward, swapped) == expected


def test_wilson_interval_matches_known_values():
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    low, high = wilson_interval(3, 3)
    assert low == pytest.approx(0.4385, abs=1e-4) and high == 1.0  # all wins on 3 prompts is far from certain
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(25, 50)  # 50 ties or 25 wins + 25 losses
    assert low == pytest.approx(1 - high) and low < 0.5 < high


def test_judge_counts_wins_losses_and_ties_through_a_real_endpoint():
    prompts = [[{"role": "user", "content": f"Question {i}?"}] for i in range(5)]
    aligned = ["A long, careful and complete answer.", "Short.", "Same answer.", "Another thorough reply with detail.", "Yes."]
    ptq = ["Brief.", "A much longer rambling answer here.", "Same answer.", "No.", "Nope, no."]
    with serve(create_app(mode="rule")) as base_url:  # prefers the longer answer, in words, without log-probs
        labeler = OpenAILabeler(LabelerSpec(kind="openai", base_url=base_url, model="rules"), "eval.judge")
        result, rows = judge_answers(labeler, prompts, aligned, ptq)
    assert [r["outcome"] for r in rows] == ["win", "loss", "tie", "win", "loss"]
    assert (result.wins, result.losses, result.ties, result.prompts) == (2, 2, 1, 5)
    assert result.win_rate == pytest.approx(2.5 / 5)
    assert (result.ci_low, result.ci_high) == pytest.approx(wilson_interval(2.5, 5))
    # identical answers are a tie without asking; every other prompt was asked in both orders
    assert result.verdicts_from == {"logprobs": 0, "parsed": 8, "unparsed": 0, "identical": 1}
    assert rows[2]["identical"] and "label" not in rows[2]
    assert "won 2, lost 2, tied 1 of 5" in result.sentence() and "8 parsed from replies" in result.sentence()


def test_pipeline_with_an_endpoint_labeler_and_judge_reports_both(tiny_model_dir, tmp_path):
    with serve(create_app(mode="rule")) as base_url:
        endpoint = {"kind": "openai", "base_url": base_url, "model": "rules", "max_retries": 0}
        spec = PipelineSpec.from_dict(
            {
                "method": "rlaif",
                "model": {"name": str(tiny_model_dir)},
                "quantization": {"method": "rtn", "bits": 4},
                "dataset": {"max_train_prompts": 4, "max_eval_prompts": 3},
                "generation": {"max_new_tokens": 6, "batch_size": 4},
                "eval": {"max_new_tokens": 6, "judge": endpoint},
                # select_best off: the judged adapter must be the trained one, whose answers differ from PTQ-only's
                "train": {"epochs": 1, "batch_size": 2, "learning_rate": 1e-2, "select_best": False},
                "rlaif": {"labeler": endpoint},
            }
        )
        events = []
        result = run_pipeline(spec, tmp_path, on_event=events.append)
    report = result.report
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(len(p["chosen"]) >= len(p["rejected"]) for p in pairs)  # the rule labeler's taste
    assert all(p["label"]["forward"]["source"] == "parsed" and p["preference"] == 1.0 for p in pairs)
    assert report["pairs"]["labels_parsed"] == 2 * (report["pairs"]["examples"] + report["pairs"].get("dropped_low_confidence", 0))
    assert "verdicts parsed from its replies" in report["pairs"]["notes"][0]
    assert any(e.level == "warning" and "no log-probabilities" in e.message for e in events)

    judge = report["judge"]
    assert judge["wins"] + judge["losses"] + judge["ties"] == judge["prompts"] == 3
    assert report["aligned"]["judge_win_rate"] == judge["win_rate"] == pytest.approx((judge["wins"] + judge["ties"] / 2) / 3)
    assert judge["ci_low"] <= judge["win_rate"] <= judge["ci_high"]
    assert judge["labeler"] == f"rules at {base_url}" and judge["verdicts_from"]["logprobs"] == 0
    verdicts = [json.loads(line) for line in (tmp_path / "evaluate" / "judge_verdicts.jsonl").read_text().splitlines()]
    aligned = [json.loads(line)["text"] for line in (tmp_path / "evaluate" / "aligned_responses.jsonl").read_text().splitlines()]
    ptq = [json.loads(line)["text"] for line in (tmp_path / "baseline" / "ptq_responses.jsonl").read_text().splitlines()]
    assert judge["verdicts_from"]["identical"] < 3  # training changed some answers, so the judge was really asked
    for row, mine, theirs in zip(verdicts, aligned, ptq):
        assert (row["candidate"], row["baseline"]) == (mine, theirs)
        expected = "tie" if mine.strip() == theirs.strip() or len(mine) == len(theirs) else ("win" if len(mine) > len(theirs) else "loss")
        assert row["outcome"] == expected
    markdown = (result.export_dir / "report.md").read_text()
    assert "| judge win-rate vs PTQ" in markdown and "Judge (rules at" in markdown and "verdicts parsed from its replies" in markdown
