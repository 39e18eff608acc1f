"""Spec validation names the field and the fix."""

import pytest

from qdpo_core.config import PipelineSpec
from qdpo_core.errors import SpecError


def _error(data) -> SpecError:
    with pytest.raises(SpecError) as info:
        PipelineSpec.from_dict(data)
    return info.value


def test_defaults_round_trip():
    spec = PipelineSpec.from_dict({"method": "kd", "quantization": {"method": "rtn", "bits": 3, "group_size": 128}})
    assert spec.quantization.bits == 3 and spec.train.lora_alpha == 32
    assert PipelineSpec.from_dict(spec.to_dict()) == spec


def test_bits_are_implied_by_bitsandbytes_methods():
    assert PipelineSpec.from_dict({"quantization": {"method": "nf4"}}).quantization.bits == 4
    assert PipelineSpec.from_dict({"quantization": {"method": "int8"}}).quantization.bits == 8


@pytest.mark.parametrize(
    "data, param, fragment",
    [
        ({"quantization": {"method": "nf4", "bits": 3}}, "quantization.bits", "use method 'rtn'"),
        ({"quantization": {"method": "rtn"}}, "quantization.bits", "rtn supports bits [2, 3, 4, 8]"),
        ({"quantization": {"method": "rtn", "bits": 5}}, "quantization.bits", "got 5"),
        ({"quantization": {"method": "gptq"}}, "quantization.method", "nf4, fp4, int8, rtn"),
        ({"method": "ppo"}, "method", "qdpo, dpo, kd, rlaif, factuality"),
        ({"method": "dpo"}, "dataset.pairs", "upload a preferences file"),
        ({"train": {"beta": 0}}, "train.beta", "got 0"),
        ({"train": {"loss": "softmax"}}, "train.loss", "sigmoid, hinge, ipo"),
        ({"train": {"learning_rate": 0.5}}, "train.learning_rate", "0.01"),
        ({"train": {"lora_rank": 0}}, "train.lora_rank", "8–16 is typical"),
        ({"generation": {"num_samples": 2}}, "generation.num_samples", "do_sample"),
        ({"dataset": {"eval_fraction": 1.5}}, "dataset.eval_fraction", "between 0 and 1"),
        ({"train": {"betta": 0.1}}, "train.betta", "unknown setting"),
        ({"colour": "red"}, "colour", "unknown setting"),
    ],
)
def test_invalid_settings_name_the_field(data, param, fragment):
    error = _error(data)
    assert error.param == param
    assert fragment in error.message
    assert error.to_dict()["code"] == "invalid_spec"


@pytest.mark.parametrize(
    "place, data", [("eval.judge", {"eval": {"judge": {"kind": "openai"}}}), ("rlaif.labeler", {"method": "rlaif", "rlaif": {"labeler": {"kind": "openai"}}})]
)
def test_a_labeler_error_names_the_place_it_was_written(place, data):
    error = _error(data)
    assert error.param == f"{place}.base_url"
    assert error.message.startswith(f"{place}.base_url: kind 'openai' needs base_url")
