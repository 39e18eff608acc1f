"""`qdpo run` (local pipeline CLI): flags become a validated spec; errors exit 2 naming the field."""

import json

from qdpo_core.cli import build_parser, main, spec_from_args


def test_flags_and_set_overrides_build_the_spec():
    args = build_parser().parse_args(
        ["--quant", "rtn", "--bits", "3", "--method", "kd", "--epochs", "1", "--set", "train.kd_weight=0.5", "--set", "eval.semantic_similarity=true"]
    )
    spec = spec_from_args(args)
    assert (spec.quantization.method, spec.quantization.bits, spec.method) == ("rtn", 3, "kd")
    assert spec.train.epochs == 1 and spec.train.kd_weight == 0.5 and spec.eval.semantic_similarity is True


def test_bad_settings_exit_2_with_the_field(capsys, tmp_path):
    assert main(["--quant", "nf4", "--bits", "3", "--out", str(tmp_path)]) == 2
    assert "quantization.bits" in capsys.readouterr().err
    assert main(["--set", "train.betta=1", "--out", str(tmp_path)]) == 2
    assert "train.betta: unknown setting" in capsys.readouterr().err


def test_run_prints_the_report_and_resumes(tiny_model_dir, tmp_path, capsys):
    argv = [
        "--model",
        str(tiny_model_dir),
        "--quant",
        "rtn",
        "--bits",
        "2",
        "--method",
        "kd",
        "--max-train-prompts",
        "4",
        "--max-eval-prompts",
        "2",
        "--max-new-tokens",
        "4",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--out",
        str(tmp_path),
        "--json",
    ]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "kd" and report["ptq"]["token_flip_rate"] > 0
    assert main(argv) == 0  # finished work directory: same report, nothing recomputed
    assert json.loads(capsys.readouterr().out)["aligned"] == report["aligned"]
