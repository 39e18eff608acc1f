"""Request models generated from qdpo_core's spec dataclasses, so the API never drifts from them.

Each dataclass (`TrainSpec`, `QuantSpec`, …) becomes a pydantic model with the same fields, every
field optional (empty = the pipeline's default), described by the dataclass's help string and
default. Unknown fields are refused. Types are strict and translated at any depth (inside lists,
dict values and keys): `str` becomes `Text` (valid Unicode, no NUL), `int` / `float` / `bool` their
strict forms (no "0.1" for a float, no `true` for an int); a field whose dataclass metadata lists
`choices` becomes a `Literal` of them (an enum in the schema); a union of several JSON kinds
(`str | list[str]`) is picked by the kind of the value sent, so an error names the element at
fault. Pydantic checks types here; `PipelineSpec` checks meaning (ranges, combinations) when the
job is created.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, create_model

from api.schemas.common import StrictBool, StrictFloat, StrictInt, Text
from qdpo_core import config as spec

SCALARS = {str: Text, int: StrictInt, float: StrictFloat, bool: StrictBool}
# The JSON kind of each Python type, for unions of several kinds; the tags appear in error
# locations between angle brackets and are left out of the `param` a client sees.
_KINDS = {str: "string", int: "number", float: "number", bool: "boolean", list: "array", dict: "object"}


class SpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def given(self) -> dict:
        """Only the fields the caller set, nested models included: defaults stay the pipeline's."""
        return self.model_dump(exclude_none=True)


def _kind_of_type(hint: Any) -> str | None:
    if isinstance(hint, type) and issubclass(hint, spec._Spec):
        return "object"
    return _KINDS.get(typing.get_origin(hint) or hint)


def _kind_of_value(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return "<object>"
    for cls in (bool, str, int, float, list, dict):  # bool before int: True is an int too
        if isinstance(value, cls):
            return f"<{_KINDS[cls]}>"
    return None


def _translate(hint: Any, cache: dict) -> Any:
    """The strict request type for a dataclass type hint, at any depth (see the module docstring)."""
    if isinstance(hint, type) and issubclass(hint, spec._Spec):
        return model_for(hint, cache=cache)
    if hint in SCALARS:
        return SCALARS[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        translated = [_translate(a, cache) for a in members]
        kinds = [_kind_of_type(a) for a in members]
        if len(members) > 1 and None not in kinds and len(set(kinds)) == len(kinds):
            # One member per JSON kind: choose by the value's kind, so only that member's errors are reported.
            tagged = typing.Union[tuple(Annotated[t, Tag(f"<{k}>")] for t, k in zip(translated, kinds))]  # type: ignore[valid-type]  # noqa: UP007
            union: Any = Annotated[
                tagged, Discriminator(_kind_of_value, custom_error_type="union_kind", custom_error_message=_kinds_message(cast("list[str]", kinds)))
            ]
        else:
            union = typing.Union[tuple(translated)]  # noqa: UP007 (built at run time)
        return union | None if type(None) in args else union
    if origin is list:
        return list[_translate(args[0], cache)]  # type: ignore[misc]
    if origin is dict:
        return dict[_translate(args[0], cache), _translate(args[1], cache)]  # type: ignore[misc]
    return hint


def _kinds_message(kinds: list[str]) -> str:
    names = {"string": "a string", "number": "a number", "boolean": "true or false", "array": "a list", "object": "an object"}
    return "use " + " or ".join(names[k] for k in kinds)


def _field_type(f: dataclasses.Field, hint: Any, cache: dict) -> Any:
    """A field with `choices` in its metadata becomes a Literal of them (an enum in the schema)."""
    choices = f.metadata.get("choices")
    if choices:
        literal = Literal[tuple(choices)]  # type: ignore[valid-type]
        return literal | None if type(None) in typing.get_args(hint) else literal
    return _translate(hint, cache)


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
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        hint = _field_type(f, hints[f.name], cache)
        fields[f.name] = (hint | None, Field(None, description=_describe(f)))
    model = create_model(
        name or cls.__name__.replace("Spec", "Settings"), __base__=SpecModel, __doc__=doc or f"Settings of qdpo_core's {cls.__name__}.", **fields
    )
    cache[key] = model
    return model


_cache: dict = {}
if TYPE_CHECKING:  # built at run time by create_model; to a type checker, each is a SpecModel
    QuantizationSettings = SpecModel
    Hyperparameters = SpecModel
    GenerationSettings = SpecModel
    EvalSettings = SpecModel
    RLAIFSettings = SpecModel
    AutoSettings = SpecModel
    FactualitySettings = SpecModel
    DatasetOptions = SpecModel
else:
    model_for(spec.LabelerSpec, "LabelerSettings", "A model that judges or labels: local, or any OpenAI-compatible endpoint.", cache=_cache)
    QuantizationSettings = model_for(spec.QuantSpec, "QuantizationSettings", "How the served model is quantized.", cache=_cache)
    Hyperparameters = model_for(spec.TrainSpec, "Hyperparameters", "Trainer settings (DPO / KD on LoRA adapters).", cache=_cache)
    GenerationSettings = model_for(spec.GenerationSpec, "GenerationSettings", "Decoding used to build preference pairs.", cache=_cache)
    EvalSettings = model_for(spec.EvalSpec, "EvalSettings", "Held-out evaluation before and after training.", cache=_cache)
    RLAIFSettings = model_for(spec.RLAIFSpec, "RLAIFSettings", "Method rlaif: pairs labelled by an AI labeler.", cache=_cache)
    AutoSettings = model_for(
        spec.AutoSpec, "AutoSettings", "Method auto: candidates tried from the initialised adapter; the best on held-out data is exported.", cache=_cache
    )
    # A client names reference passages by an uploaded file id (method.factuality.references_file_id), never a path.
    FactualitySettings = model_for(spec.FactualitySpec, "FactualitySettings", "Method factuality: FactTune-style pairs.", exclude=("references",), cache=_cache)
    # The dataset's file paths are the worker's business; the API takes file ids instead (see DatasetSettings).
    DatasetOptions = model_for(
        spec.DataSpec, "DatasetOptions", "How the prompts are split and capped.", exclude=("prompts", "pairs", "eval_prompts"), cache=_cache
    )
