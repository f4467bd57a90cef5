"""GET /v1/models and /v1/models/{id} in the OpenAI shape; POST /admin/reload swaps in new or
replaced artifacts (SIGHUP does the same)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from service.errors import ApiError
from service.models import ModelRegistry, ServedModel
from service.responses import served_model
from service.routes.deps import ApiKeyDep, ModelsDep, StateDep, api_key
from service.schemas import ERROR_RESPONSES

router = APIRouter(tags=["models"], dependencies=[Depends(api_key)], responses=ERROR_RESPONSES)


def _card(model: ServedModel, models: ModelRegistry) -> dict[str, Any]:
    config = model.config
    return {
        "id": model.id,
        "object": "model",
        "created": model.created,
        "owned_by": "linmod",
        # Beyond OpenAI's four fields: what a client needs to read the scores.
        "version": config.version,
        "labels": config.labels,
        "flag_labels": config.flag_labels,
        "threshold": config.threshold,
        "n_max": config.n_max,
        "provider": model.engine.provider,
        "precision": model.engine.precision,
        "default": model.id == models.default_id,
    }


@router.get("/v1/models")
async def list_models(models: ModelsDep) -> dict[str, Any]:
    """The models this process serves (OpenAI's list shape)."""
    data = [_card(models.models[name], models) for name in sorted(models.models)]
    return {"object": "list", "data": data}


@router.get("/v1/models/{model_id}")
async def get_model(model_id: str, models: ModelsDep) -> dict[str, Any]:
    """One model, or 404 listing the models served."""
    return _card(served_model(models, model_id), models)


@router.post("/admin/reload")
async def reload_models(state: StateDep, key: ApiKeyDep) -> dict[str, Any]:
    """Load new or replaced artifact folders, warm them, move traffic, drain the old versions.
    Needs a key: a server without keys refuses it (send SIGHUP instead)."""
    if key is None or state.models is None:
        raise ApiError(
            403, "reloading over HTTP needs API keys (--api-keys); send the process SIGHUP",
            type="permission_error", code="forbidden", reason="unauthorized",
        )  # fmt: skip
    return await state.models.reload()
