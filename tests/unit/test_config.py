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


@pytest.mark.parametrize(
    "data, param, fragment",
    [
        ({"seed": 2**70}, "seed", "up to 4,294,967,295"),
        ({"seed": True}, "seed", "got True"),
        ({"generation": {"num_samples": 10**6, "do_sample": True}}, "generation.num_samples", "1..64"),
        ({"generation": {"batch_size": 10**9}}, "generation.batch_size", "1..1,024"),
        ({"generation": {"temperature": 1e9}}, "generation.temperature", "up to 10"),
        ({"generation": {"do_sample": 1}}, "generation.do_sample", "true or false"),
        ({"train": {"target_modules": ["q_proj"] * 2000}}, "train.target_modules", "got 2,000 entries"),
        ({"train": {"target_modules": []}}, "train.target_modules", "1 to 64 module names"),
        ({"train": {"target_modules": ["q_proj", "\ud800"]}}, "train.target_modules[1]", "module name"),
        ({"train": {"target_modules": "everything"}}, "train.target_modules", "'all-linear'"),
        ({"train": {"beta": "0.1"}}, "train.beta", "got '0.1'"),
        ({"train": {"beta": float("nan")}}, "train.beta", "got nan"),
        ({"train": {"epochs": True}}, "train.epochs", "got True"),
        ({"train": {"gradient_accumulation_steps": 10**12}}, "train.gradient_accumulation_steps", "1..1,024"),
        ({"train": {"checkpoint_every": 1.5}}, "train.checkpoint_every", "got 1.5"),
        ({"train": {"early_stopping_patience": -1}}, "train.early_stopping_patience", "0..1,000"),
        ({"train": {"select_best": "yes"}}, "train.select_best", "true or false"),
        ({"train": {"kd_weight": float("inf")}}, "train.kd_weight", "0..100"),
        ({"train": {"lora_plus_ratio": 0.5}}, "train.lora_plus_ratio", "[1, 64]"),
        ({"train": {"train_norms": "yes"}}, "train.train_norms", "true or false"),
        ({"quantization": {"method": "gguf", "type": "Q4_0"}, "train": {"train_norms": True}}, "train.train_norms", "llama.cpp"),
        ({"train": {"dora": 1}}, "train.dora", "true or false"),
        ({"quantization": {"method": "gguf", "type": "Q4_0"}, "train": {"dora": True}}, "train.dora", "llama.cpp"),
        ({"quantization": {"method": "int8"}, "train": {"dora": True}}, "train.dora", "int8"),
        ({"quantization": {"method": "rtn", "bits": 3, "double_quant": True}}, "quantization.double_quant", "nf4, fp4"),
        ({"quantization": {"method": "rtn", "bits": 4.0}}, "quantization.bits", "got 4.0"),
        ({"quantization": {"method": "nf4", "group_size": "64"}}, "quantization.group_size", "got '64'"),
        ({"quantization": 5}, "quantization", "give an object"),
        ({"dataset": {"max_train_prompts": 10**12}}, "dataset.max_train_prompts", "1..1,000,000"),
        ({"dataset": {"max_prompt_tokens": 10**9}}, "dataset.max_prompt_tokens", "8..32,768"),
        ({"dataset": {"eval_fraction": True}}, "dataset.eval_fraction", "got True"),
        ({"dataset": {"prompts": "a\x00b.jsonl"}}, "dataset.prompts", "NUL"),
        ({"eval": {"batch_size": 0}}, "eval.batch_size", "1..1,024"),
        ({"eval": {"judge": {"model": "m\ud800"}}}, "eval.judge.model", "lone surrogate"),
        ({"eval": {"judge": {"model": "m" * 201}}}, "eval.judge.model", "at most 200"),
        ({"eval": {"judge": {"kind": "openai", "base_url": "http://\ud800/v1"}}}, "eval.judge.base_url", "lone surrogate"),
        ({"eval": {"judge": {"kind": "openai", "base_url": "http://h\x00/v1"}}}, "eval.judge.base_url", "NUL"),
        ({"eval": {"judge": {"kind": "openai", "base_url": "http:///v1"}}}, "eval.judge.base_url", "http:// or https:// URL"),
        ({"eval": {"judge": {"timeout_seconds": 10**9}}}, "eval.judge.timeout_seconds", "up to 600"),
        ({"eval": {"judge": {"api_key_env": "A B"}}}, "eval.judge.api_key_env", "environment variable"),
        ({"method": "rlaif", "rlaif": {"labeler": {"batch_size": 10**6}}}, "rlaif.labeler.batch_size", "1..1,024"),
        ({"method": "rlaif", "rlaif": {"min_confidence": "0.1"}}, "rlaif.min_confidence", "got '0.1'"),
        ({"method": "factuality", "factuality": {"num_samples": 10**6}}, "factuality.num_samples", "2..64"),
        ({"method": "factuality", "factuality": {"max_claims": 10**6}}, "factuality.max_claims", "1..64"),
        ({"method": "factuality", "factuality": {"labeler": "local"}}, "factuality.labeler", "give an object"),
    ],
)
def test_every_number_list_and_string_is_bounded_and_typed(data, param, fragment):
    error = _error(data)
    assert error.param == param, error.message
    assert fragment in error.message, error.message
    assert error.message.startswith(param + ":")


def test_bool_is_not_an_integer_even_when_built_directly():
    from qdpo_core.config import TrainSpec

    with pytest.raises(SpecError, match=r"train\.epochs: got True"):
        TrainSpec(epochs=True)


def test_choice_fields_carry_their_choices():
    import dataclasses

    from qdpo_core import config

    choices = {
        (cls.__name__, f.name): f.metadata.get("choices")
        for cls in (config.PipelineSpec, config.QuantSpec, config.TrainSpec, config.LabelerSpec, config.RLAIFSpec, config.FactualitySpec, config.ModelSpec)
        for f in dataclasses.fields(cls)
    }
    assert choices[("PipelineSpec", "method")] == config.METHODS
    assert choices[("QuantSpec", "method")] == config.QUANT_METHODS
    assert choices[("TrainSpec", "loss")] == config.LOSSES and choices[("TrainSpec", "selection_metric")] == config.SELECTION_METRICS
    assert choices[("LabelerSpec", "kind")] == ("local", "openai")
    assert choices[("RLAIFSpec", "response_model")] == choices[("FactualitySpec", "response_model")] == ("quantized", "fp")
    assert choices[("FactualitySpec", "scorer")] == ("consistency", "logprob", "reference")
    assert choices[("ModelSpec", "dtype")] == ("float32", "bfloat16", "float16", "auto")
