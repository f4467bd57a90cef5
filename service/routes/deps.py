"""Typed dependencies shared by the routers: state, readiness, API keys, content type, limits."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Annotated

from fastapi import Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.auth import KEY_ID, UNAUTHORIZED_MESSAGE, match_key
from service.batcher import BatcherError
from service.classifier import Classification, Classifier
from service.documents import DocumentError
from service.errors import ApiError, from_classify_error
from service.middleware import started_at
from service.settings import Aggregation, LongDocumentPolicy, Settings
from service.state import ServiceState, get_state

_bearer = HTTPBearer(auto_error=False, description="one of the server's API keys, if it has any")


def _state(request: Request) -> ServiceState:
    return get_state(request.app)


StateDep = Annotated[ServiceState, Depends(_state)]


def ready_classifier(state: StateDep) -> Classifier:
    """The classifier, or 503 while the model loads and warms up or the server stops."""
    if state.stopping:
        raise ApiError(
            503, "the server is shutting down", type="service_unavailable",
            code="shutting_down", reason="shutting_down", headers={"Retry-After": "1"},
        )  # fmt: skip
    if not state.ready or state.classifier is None:
        raise ApiError(
            503, "the model is not ready yet", type="service_unavailable",
            code="not_ready", reason="not_ready", headers={"Retry-After": "1"},
        )  # fmt: skip
    return state.classifier


ClassifierDep = Annotated[Classifier, Depends(ready_classifier)]


def api_key(
    request: Request,
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str | None:
    """The caller's key id; None when the server has no keys. 401 for a missing or wrong key
    (ApiKeyMiddleware has refused those already, before the body was read)."""
    keys = state.settings.api_keys
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


def require_json(request: Request) -> None:
    """415 unless the body is declared as JSON."""
    declared = request.headers.get("content-type", "")
    mime = declared.split(";", 1)[0].strip().lower()
    if mime != "application/json" and not mime.endswith("+json"):
        raise ApiError(
            415, f"Content-Type must be application/json, not {declared or 'missing'!r}",
            code="unsupported_media_type", reason="invalid",
        )  # fmt: skip


def check_limits(texts: Sequence[str], settings: Settings) -> None:
    """413 for too many inputs or a text over the character cap (which guards the tokenizer)."""
    if len(texts) > settings.max_inputs:
        raise ApiError(
            413, f"{len(texts)} inputs is over the limit of {settings.max_inputs} per request",
            code="too_many_inputs", reason="too_large",
        )  # fmt: skip
    for i, text in enumerate(texts):
        if len(text) > settings.max_chars:
            raise ApiError(
                413, f"input[{i}] has {len(text)} characters, over the limit of "
                f"{settings.max_chars}", code="input_too_long", reason="too_large",
            )  # fmt: skip


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next message is the client's disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def classify_texts(
    request: Request,
    response: Response,
    classifier: Classifier,
    settings: Settings,
    texts: list[str],
    *,
    long_document: LongDocumentPolicy | None,
    aggregation: Aggregation | None,
) -> Classification:
    """Classify for an HTTP caller: limits, deadline, disconnects, errors and timing headers."""
    check_limits(texts, settings)
    arrived = started_at(request.scope) or asyncio.get_running_loop().time()
    deadline = arrived + settings.request_timeout_s
    work = asyncio.ensure_future(
        classifier.classify(
            texts,
            long_document=long_document or settings.long_document,
            aggregation=aggregation,
            deadline=deadline,
        )
    )
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            # The client has gone (or the server stops): its windows leave the queue.
            work.cancel()
            await asyncio.wait({work})
    if work.cancelled():
        raise ApiError(499, "the client closed the request", code="client_closed")
    try:
        outcome = work.result()
    except (BatcherError, DocumentError) as exc:
        raise from_classify_error(exc) from exc
    response.headers["x-tokenization-time-ms"] = f"{outcome.tokenize_s * 1000:.2f}"
    response.headers["x-queue-time-ms"] = f"{outcome.queue_s * 1000:.2f}"
    response.headers["x-inference-time-ms"] = f"{outcome.inference_s * 1000:.2f}"
    return outcome
