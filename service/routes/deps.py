"""Typed dependencies shared by the routers: state, readiness, API keys, content type."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.auth import KEY_ID, UNAUTHORIZED_MESSAGE, match_key
from service.classifier import Classifier
from service.errors import ApiError
from service.models import ModelRegistry
from service.state import ServiceState, get_state

_bearer = HTTPBearer(auto_error=False, description="one of the server's API keys, if it has any")


async def bearer_credentials(request: Request) -> HTTPAuthorizationCredentials | None:
    """The Authorization header's bearer token, read as `Depends(_bearer)` reads it."""
    return await _bearer(request)


async def _state(request: Request) -> ServiceState:
    return get_state(request.app)


StateDep = Annotated[ServiceState, Depends(_state)]


def unavailable(message: str, code: str) -> ApiError:
    """503 with Retry-After, for a part of the server that is starting or stopping."""
    return ApiError(
        503, message, type="service_unavailable", code=code, reason=code,
        headers={"Retry-After": "1"},
    )  # fmt: skip


def _check_ready(state: ServiceState, loaded: object) -> None:
    """503 while the models load and warm up, or once the server stops."""
    if state.stopping:
        raise unavailable("the server is shutting down", "shutting_down")
    if not state.ready or loaded is None:
        raise unavailable("the model is not ready yet", "not_ready")


async def ready_classifier(state: StateDep) -> Classifier:
    """The classifier, or 503 while the model loads and warms up or the server stops."""
    _check_ready(state, state.classifier)
    assert state.classifier is not None
    return state.classifier


ClassifierDep = Annotated[Classifier, Depends(ready_classifier)]


async def ready_models(state: StateDep) -> ModelRegistry:
    """The served models, or 503 while they load and warm up or the server stops."""
    _check_ready(state, state.models)
    assert state.models is not None
    return state.models


ModelsDep = Annotated[ModelRegistry, Depends(ready_models)]


async def api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str | None:
    """The caller's key id; None when the server has no keys. 401 for a missing or wrong key
    (ApiKeyMiddleware has refused those already, before the body was read)."""
    keys = get_state(request.app).settings.api_keys
    if not keys:
        return None
    checked = request.scope.get("state", {}).get(KEY_ID)
    if isinstance(checked, str):
        return checked
    given = f"Bearer {credentials.credentials}" if credentials else ""
    found = match_key(given, keys)
    if found is not None:
        return found
    raise ApiError(
        401, UNAUTHORIZED_MESSAGE, type="authentication_error", code="invalid_api_key",
        reason="unauthorized", headers={"WWW-Authenticate": "Bearer"},
    )  # fmt: skip


ApiKeyDep = Annotated[str | None, Depends(api_key)]


async def require_json(request: Request) -> None:
    """415 unless the body is declared as JSON."""
    declared = request.headers.get("content-type", "")
    mime = declared.split(";", 1)[0].strip().lower()
    if mime != "application/json" and not mime.endswith("+json"):
        raise ApiError(
            415, f"Content-Type must be application/json, not {declared or 'missing'!r}",
            code="unsupported_media_type", reason="invalid",
        )  # fmt: skip
