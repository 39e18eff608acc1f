"""End to end on the real bundled SmolLM2-135M-Instruct: one small rlaif job and one small factuality job.

The 135M model is a weak labeler (it says "1" most of the time whatever it is shown), so these
jobs keep every pair the swap-averaged label leans on at all; what is checked is that the real
model runs through every stage and that what lands in the pairs file and the report is coherent.
"""

import json

import pytest
import torch

from qdpo_core.config import PipelineSpec
from qdpo_core.export import verify
from qdpo_core.pipeline import run_pipeline

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
SMALL_JOB = {
    "model": {"name": MODEL},
    # RTN keeps dense weights: far faster on a CPU than bitsandbytes 4-bit, and it still flips tokens
    "quantization": {"method": "rtn", "bits": 4, "group_size": 64},
    "dataset": {"max_train_prompts": 3, "max_eval_prompts": 2},
    "generation": {"max_new_tokens": 12, "batch_size": 4},
    "eval": {"max_new_tokens": 12, "batch_size": 2},
    "train": {"epochs": 1, "batch_size": 2, "learning_rate": 5e-4},
}
# FactTune is about facts: questions whose answers a 135M model sometimes knows and sometimes not
FACT_QUESTIONS = ["What is the capital of France?", "What is the largest planet in the solar system?", "Who wrote Romeo and Juliet?"]
HELD_OUT_QUESTIONS = ["What is the capital of Italy?", "Who painted the Mona Lisa?"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    # On a 2-core machine shared with other jobs, torch's two spinning threads ran these jobs
    # about 3x slower than one thread (measured: 181 s vs 64 s for the rlaif job).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pairs(workdir):
    return [json.loads(line) for line in (workdir / "pairs.jsonl").read_text().splitlines()]


def test_rlaif_job_with_a_judge_on_bundled_smollm2(tmp_path):
    spec = PipelineSpec.from_dict(
        {
            **SMALL_JOB,
            "method": "rlaif",
            "rlaif": {"min_confidence": 0.0, "labeler": {"model": MODEL}},
            "eval": {**SMALL_JOB["eval"], "judge": {"model": MODEL}},
            # the judge should see the trained adapter's answers, not the identity a selection may fall back to
            "train": {**SMALL_JOB["train"], "learning_rate": 2e-3, "select_best": False},
        }
    )
    result = run_pipeline(spec, tmp_path)
    report = result.report
    pairs = _pairs(tmp_path)
    assert report["pairs"]["examples"] == len(pairs) >= 1
    assert report["pairs"]["labels_logprobs"] >= 2 * len(pairs)  # a local labeler always gives log-probs
    for pair in pairs:
        assert pair["preference"] > 0.5 and pair["chosen"] in pair["responses"] and pair["rejected"] in pair["responses"]
        assert set(pair["label"]["forward"]) >= {"probs", "logprobs"}
    judge = report["judge"]
    assert judge["prompts"] == 2 and judge["wins"] + judge["losses"] + judge["ties"] == 2
    assert judge["labeler"] == f"local model {MODEL}"
    asked = judge["prompts"] - judge["verdicts_from"]["identical"]
    assert asked >= 1 and judge["verdicts_from"]["logprobs"] == 2 * asked  # both orders, soft labels
    assert report["aligned"]["judge_win_rate"] == judge["win_rate"]
    assert verify(result.export_dir)["method"] == "rlaif"


def _prompts_file(path, questions):
    path.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    return str(path)


def test_factuality_job_with_consistency_scores_on_bundled_smollm2(tmp_path):
    spec = PipelineSpec.from_dict(
        {
            **SMALL_JOB,
            "method": "factuality",
            "dataset": {
                "prompts": _prompts_file(tmp_path / "train.jsonl", FACT_QUESTIONS),
                "eval_prompts": _prompts_file(tmp_path / "eval.jsonl", HELD_OUT_QUESTIONS),
            },
            "generation": {"max_new_tokens": 16, "batch_size": 9},
            "factuality": {
                "scorer": "consistency",
                "num_samples": 3,
                "num_questions": 2,
                "max_claims": 1,
                "min_score_gap": 0.0,
                "labeler": {"model": MODEL, "batch_size": 9},
            },
        }
    )
    result = run_pipeline(spec, tmp_path / "run")
    report = result.report
    pairs = _pairs(tmp_path / "run")
    assert report["pairs"]["examples"] == len(pairs) >= 1
    assert report["pairs"]["responses_generated"] == 3 * 3 and report["pairs"]["claims_scored"] >= 1
    for pair in pairs:
        assert pair["scorer"] == "consistency" and pair["chosen_score"] > pair["rejected_score"]
        assert pair["chosen_claims"]  # the winner had something checkable that came back when re-asked
        assert all(len(c["answers"]) == 2 for c in pair["chosen_claims"] + pair["rejected_claims"])
    assert verify(result.export_dir)["method"] == "factuality"
