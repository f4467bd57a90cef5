"""One batch line through the endpoint it names: the route's own validation, limits and response
body, classified at batch priority, so a line's output is what the HTTP endpoint would answer.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from service.batcher import BatcherClosedError, BatcherError, Priority
from service.documents import DocumentError
from service.errors import ApiError, error_body, from_classify_error, validation_error
from service.inputs import extract_inputs
from service.responses import (
    check_limits,
    classify_response,
    moderation_response,
    served_model,
)
from service.schemas import ClassifyRequest, InputFormat, ModerationRequest
from service.settings import Aggregation, LongDocumentPolicy
from service.state import ServiceState


def _parse(
    endpoint: str, body: Any
) -> tuple[list[str], InputFormat, LongDocumentPolicy | None, Aggregation | None, bool, str | None]:
    # from_attributes as FastAPI validates bodies, so error messages match the route's.
    if endpoint == "/v1/moderations":
        moderation = ModerationRequest.model_validate(body, from_attributes=True)
        return moderation.texts(), moderation.input_format, None, None, False, moderation.model
    request = ClassifyRequest.model_validate(body, from_attributes=True)
    texts = [request.input] if isinstance(request.input, str) else request.input
    return (
        texts, request.input_format, request.long_document, request.aggregation,
        request.return_evidence, request.model,
    )  # fmt: skip


async def dispatch(state: ServiceState, endpoint: str, body: str, rid: str) -> tuple[int, Any]:
    """(status code, response body) of the endpoint for this JSON body. Raises
    BatcherClosedError while the server stops, so the line can be handed back unfinished."""
    settings = state.settings
    if state.models is None or not state.models.models:
        raise BatcherClosedError("the classifier is not running")
    try:
        inputs, input_format, long_document, aggregation, evidence, model = _parse(
            endpoint, json.loads(body)
        )
        served = served_model(state.models, model, openai_moderation=endpoint == "/v1/moderations")
        texts, extractions = await extract_inputs(inputs, input_format, settings)
        check_limits(texts, settings)
        async with served.lease():
            outcome = await served.classifier.classify(
                texts,
                long_document=long_document or settings.long_document,
                aggregation=aggregation,
                priority=Priority.BATCH,
                wait_for_room=True,
                evidence=evidence,
            )
    except ValidationError as exc:
        return _answer(validation_error(exc.errors()))
    except ApiError as exc:
        return _answer(exc)
    except BatcherClosedError:
        raise
    except (BatcherError, DocumentError) as exc:
        return _answer(from_classify_error(exc))
    if endpoint == "/v1/moderations":
        response = moderation_response(outcome, served.config, served.id, rid, extractions)
        return 200, response.model_dump(mode="json")
    answer = classify_response(outcome, served.id, rid, extractions)
    return 200, answer.model_dump(mode="json")


def _answer(error: ApiError) -> tuple[int, Any]:
    return error.status, error_body(error.message, error.type, error.code)
