"""Request models generated from qdpo_core's spec dataclasses, so the API never drifts from them.

Each dataclass (`TrainSpec`, `QuantSpec`, …) becomes a pydantic model with the same fields, every
field optional (empty = the pipeline's default), described by the dataclass's help string and
default. Unknown fields are refused. Pydantic checks types here; `PipelineSpec` checks meaning
(ranges, combinations) when the job is created.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from qdpo_core import config as spec


class SpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def given(self) -> dict:
        """Only the fields the caller set, nested models included: defaults stay the pipeline's."""
        return self.model_dump(exclude_none=True)


def _translate(hint: Any, cache: dict) -> Any:
    """Replace nested spec dataclasses inside a type hint by their generated models."""
    if isinstance(hint, type) and issubclass(hint, spec._Spec):
        return model_for(hint, cache=cache)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_translate(a, cache) for a in typing.get_args(hint))]  # type: ignore[return-value]  # noqa: UP007 (built at run time)
    return hint


def _describe(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    if f.default is not dataclasses.MISSING and f.default is not None:
        text += f" Default: {f.default!r}."
    return text


def model_for(cls: type, name: str | None = None, doc: str | None = None, exclude: tuple[str, ...] = (), cache: dict | None = None) -> type[SpecModel]:
    cache = {} if cache is None else cache
    key = (cls, name, exclude)
    if key in cache:
        return cache[key]
    hints = typing.get_type_hints(cls)
    fields = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        hint = _translate(hints[f.name], cache)
        fields[f.name] = (hint | None, Field(None, description=_describe(f)))
    model = create_model(
        name or cls.__name__.replace("Spec", "Settings"), __base__=SpecModel, __doc__=doc or f"Settings of qdpo_core's {cls.__name__}.", **fields
    )
    cache[key] = model
    return model


_cache: dict = {}
model_for(spec.LabelerSpec, "LabelerSettings", "A model that judges or labels: local, or any OpenAI-compatible endpoint.", cache=_cache)
QuantizationSettings = model_for(spec.QuantSpec, "QuantizationSettings", "How the served model is quantized.", cache=_cache)
Hyperparameters = model_for(spec.TrainSpec, "Hyperparameters", "Trainer settings (DPO / KD on LoRA adapters).", cache=_cache)
GenerationSettings = model_for(spec.GenerationSpec, "GenerationSettings", "Decoding used to build preference pairs.", cache=_cache)
EvalSettings = model_for(spec.EvalSpec, "EvalSettings", "Held-out evaluation before and after training.", cache=_cache)
RLAIFSettings = model_for(spec.RLAIFSpec, "RLAIFSettings", "Method rlaif: pairs labelled by an AI labeler.", cache=_cache)
# A client names reference passages by an uploaded file id (method.factuality.references_file_id), never a path.
FactualitySettings = model_for(spec.FactualitySpec, "FactualitySettings", "Method factuality: FactTune-style pairs.", exclude=("references",), cache=_cache)
# The dataset's file paths are the worker's business; the API takes file ids instead (see DatasetSettings).
DatasetOptions = model_for(spec.DataSpec, "DatasetOptions", "How the prompts are split and capped.", exclude=("prompts", "pairs", "eval_prompts"), cache=_cache)
