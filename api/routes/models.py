"""/v1/models: the base models this deployment offers and how each can be quantized."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentTenant
from api.schemas.common import error_responses
from api.schemas.models import ModelList, ModelPublic
from qdpo_core import registry
from service.errors import not_found

router = APIRouter(prefix="/models", tags=["models"])


def model_public(model: registry.RegisteredModel) -> ModelPublic:
    # The source (a server path or hub id) is the operator's business and is not shown.
    return ModelPublic(id=model.name, description=model.description, quantizations=model.quantizations)


@router.get("", response_model=ModelList, responses=error_responses(401))
def list_models(_tenant: CurrentTenant) -> ModelList:
    """List the base models jobs can use."""
    return ModelList(data=[model_public(m) for m in registry.registered_models()])


@router.get("/{model_id}", response_model=ModelPublic, responses=error_responses(401, 404))
def get_model(model_id: str, _tenant: CurrentTenant) -> ModelPublic:
    """Get one base model and its quantization options."""
    model = registry.lookup(model_id)
    if model is None:
        raise not_found("model", model_id)
    return model_public(model)
