"""Labelers: the models that judge answers for RLAIF, FactTune scoring and the eval judge.

    from qdpo_core.labelers import labeler_for
    labeler = labeler_for(spec.rlaif.labeler, models, place="rlaif.labeler")
    labeler.choose(conversations, ("1", "2"))

kind 'local' loads a chat model here (reusing the job's FP teacher when `model` names the job's
own model, so there is no second copy in memory); kind 'openai' talks to a chat-completions
endpoint over HTTP. Both implement `labelers.base.Labeler`.
"""

from __future__ import annotations

from qdpo_core.config import LabelerSpec
from qdpo_core.labelers.base import Choice, Labeler, LabelerBadResponse, LabelerUnavailable

__all__ = ["Choice", "Labeler", "LabelerBadResponse", "LabelerUnavailable", "labeler_for"]


def labeler_for(spec: LabelerSpec, models, place: str) -> Labeler:
    """The labeler a spec describes; `models` is the pipeline's ModelHolder, `place` the spec's path for errors."""
    if spec.kind == "openai":
        from qdpo_core.labelers.openai_api import OpenAILabeler

        return OpenAILabeler(spec, place)
    from qdpo_core.errors import ModelUnavailable
    from qdpo_core.labelers.local import LocalLabeler
    from qdpo_core.models import load_full_precision, load_tokenizer, resolve_model_dir

    try:
        model_dir = resolve_model_dir(spec.model)
    except ModelUnavailable as exc:
        message = exc.message.replace("model.name:", f"{place}.model:", 1)
        raise ModelUnavailable(message, param=f"{place}.model") from exc
    if model_dir.resolve() == models.model_dir.resolve():
        return LocalLabeler(models.teacher, models.tokenizer, spec.model, spec.batch_size)
    model = load_full_precision(model_dir, models.device, models.dtype)
    return LocalLabeler(model, load_tokenizer(model_dir), spec.model, spec.batch_size)
