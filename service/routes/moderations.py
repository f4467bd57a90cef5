"""POST /v1/moderations: the OpenAI moderation API, so OpenAI clients only change base_url."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from service.inputs import extract_inputs
from service.middleware import request_id
from service.responses import json_body, moderation_response, served_model
from service.routes.caller import classify_for_caller
from service.routes.deps import api_key, ready_models, require_json
from service.schemas import ERROR_RESPONSES, ModerationRequest, ModerationResponse
from service.state import get_state

router = APIRouter(
    prefix="/v1",
    tags=["moderations"],
    dependencies=[Depends(api_key), Depends(require_json)],
    responses=ERROR_RESPONSES,
)


@router.post("/moderations", response_model=ModerationResponse)
async def moderations(body: ModerationRequest, request: Request, response: Response) -> Response:
    """Moderate each input; the categories are the model's flag labels. Email and HTML inputs
    report what was extracted from them."""
    state = get_state(request.app)
    models = await ready_models(state)
    served = served_model(models, body.model, openai_moderation=True)
    texts, extractions = await extract_inputs(body.texts(), body.input_format, state.settings)
    async with served.lease():
        outcome = await classify_for_caller(
            request, response, served.classifier, state.settings, texts,
            long_document=None, aggregation=None,
        )  # fmt: skip
    body_out = moderation_response(
        outcome, served.config, served.id, request_id(request.scope), extractions
    )
    return json_body(body_out, response)
