"""POST /v1/classify: labels and scores for one text or a list, with long-document handling; a
JSON body, or one raw mail message as a `message/rfc822` body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.errors import ApiError, validation_error
from service.inputs import extract_inputs
from service.middleware import request_id
from service.responses import classify_response, json_body, served_model
from service.routes.caller import classify_for_caller
from service.routes.deps import api_key, ready_models
from service.routes.direct import DirectRoute
from service.schemas import (
    ERROR_RESPONSES,
    ClassifyRequest,
    ClassifyResponse,
    InputFormat,
)
from service.settings import Aggregation, LongDocumentPolicy
from service.state import get_state
from service.texts import SafeStr

MAIL_TYPE = "message/rfc822"

router = APIRouter(
    prefix="/v1",
    tags=["classify"],
    dependencies=[Depends(api_key)],
    responses=ERROR_RESPONSES,
    route_class=DirectRoute,
)


class MailOptions(BaseModel):
    """The options of a raw-message request, read from its query string."""

    model_config = ConfigDict(extra="ignore")

    long_document: LongDocumentPolicy | None = Field(
        None, description="message/rfc822 bodies only: see the JSON field"
    )
    aggregation: Aggregation | None = Field(
        None, description="message/rfc822 bodies only: see the JSON field"
    )
    return_evidence: bool = Field(
        False, description="message/rfc822 bodies only: see the JSON field"
    )
    model: SafeStr | None = Field(
        None, description="message/rfc822 bodies only: see the JSON field"
    )


# The body and the query string are read by hand (JSON, or a raw message and its options), so
# the schema documents both forms; FastAPI's per-request parameter solving is skipped for them.
_BODY: dict[str, Any] = {
    "parameters": [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": field.get("description", ""),
            "schema": {k: v for k, v in field.items() if k != "description"},
        }
        for name, field in MailOptions.model_json_schema()["properties"].items()
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": ClassifyRequest.model_json_schema()},
            MAIL_TYPE: {
                "schema": {"type": "string", "format": "binary"},
                "example": "Subject: Lunch?\nContent-Type: text/plain\n\nAt noon, as usual.\n",
            },
        },
        "description": "a JSON request, or one raw RFC 822 message (the options as query "
        "parameters); the message's exact bytes are parsed, 8-bit charsets included",
    },
}


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


# Parsing and validating a body this large can take milliseconds (a 4 MB list of many short
# strings runs a validator per string): it runs in a worker thread, where the event loop can
# take the GIL back between steps.
LARGE_BODY = 64 * 1024


def _parse(raw: bytes) -> ClassifyRequest:
    # pydantic's own JSON parser validates while it parses, about ten times quicker than
    # json.loads then validation (0.7 against 7.8 ms for 4 MB). A body it refuses goes the slow
    # way below, whose messages say what is wrong (a lone surrogate, bad UTF-8, where) in the
    # words batch-job lines get for the same body.
    with contextlib.suppress(ValidationError):
        return ClassifyRequest.model_validate_json(raw)
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise ApiError(
            400, "the body is not valid UTF-8", code="invalid_encoding", reason="invalid"
        ) from exc
    except json.JSONDecodeError as exc:
        raise ApiError(
            400, f"the body is not valid JSON: {exc.msg}", code="invalid_json", reason="invalid"
        ) from exc
    try:
        return ClassifyRequest.model_validate(data, from_attributes=True)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc


async def _json_request(request: Request) -> ClassifyRequest:
    raw = await request.body()
    if not raw:
        raise ApiError(
            422, "invalid request: body: field required", code="invalid_input", reason="invalid"
        )
    if len(raw) > LARGE_BODY:
        return await asyncio.to_thread(_parse, raw)
    return _parse(raw)


def _mail_options(request: Request) -> MailOptions:
    try:
        return MailOptions.model_validate(dict(request.query_params))
    except ValidationError as exc:
        errors = [{**e, "loc": ("query", *e["loc"])} for e in exc.errors()]
        raise validation_error(errors) from exc


@router.post("/classify", response_model=ClassifyResponse, openapi_extra=_BODY)
async def classify(request: Request, response: Response) -> Response:
    """Classify each text, or a raw message; texts over n_max tokens are chunked, truncated or
    refused. Email and HTML inputs report what was extracted from them."""
    state = get_state(request.app)
    models = await ready_models(state)
    media = _media_type(request)
    items: Sequence[str | bytes]
    input_format: InputFormat
    long_document: LongDocumentPolicy | None
    aggregation: Aggregation | None
    if media == MAIL_TYPE:
        options = _mail_options(request)
        raw = await request.body()
        if not raw.strip():
            raise ApiError(422, "the message body is empty", code="empty", reason="invalid")
        items, input_format = [raw], "email"
        long_document, aggregation = options.long_document, options.aggregation
        return_evidence, model = options.return_evidence, options.model
    elif media == "application/json" or media.endswith("+json"):
        if set(request.query_params) & set(MailOptions.model_fields):
            raise ApiError(
                422, "query parameters are for message/rfc822 bodies; put the options in the "
                "JSON body", code="invalid_input", reason="invalid",
            )  # fmt: skip
        body = await _json_request(request)
        items = [body.input] if isinstance(body.input, str) else body.input
        input_format, long_document, aggregation, return_evidence, model = (
            body.input_format, body.long_document, body.aggregation, body.return_evidence,
            body.model,
        )  # fmt: skip
    else:
        declared = request.headers.get("content-type", "")
        raise ApiError(
            415, f"Content-Type must be application/json or {MAIL_TYPE}, not "
            f"{declared or 'missing'!r}", code="unsupported_media_type", reason="invalid",
        )  # fmt: skip
    served = served_model(models, model)
    texts, extractions = await extract_inputs(items, input_format, state.settings)
    async with served.lease():
        outcome = await classify_for_caller(
            request, response, served.classifier, state.settings, texts,
            long_document=long_document, aggregation=aggregation, evidence=return_evidence,
        )  # fmt: skip
    answer = classify_response(outcome, served.id, request_id(request.scope), extractions)
    return json_body(answer, response)
