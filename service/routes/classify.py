"""POST /v1/classify: labels and scores for one text or a list, with long-document handling."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from service.classifier import Classification
from service.middleware import request_id
from service.routes.deps import ClassifierDep, StateDep, api_key, classify_texts, require_json
from service.schemas import (
    ERROR_RESPONSES,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyResult,
    Usage,
)

router = APIRouter(
    prefix="/v1",
    tags=["classify"],
    dependencies=[Depends(api_key), Depends(require_json)],
    responses=ERROR_RESPONSES,
)


@router.post("/classify", response_model=ClassifyResponse)
async def classify(
    body: ClassifyRequest,
    request: Request,
    response: Response,
    state: StateDep,
    classifier: ClassifierDep,
) -> ClassifyResponse:
    """Classify each text; texts over n_max tokens are chunked, truncated or refused."""
    texts = [body.input] if isinstance(body.input, str) else body.input
    outcome = await classify_texts(
        request, response, classifier, state.settings, texts,
        long_document=body.long_document, aggregation=body.aggregation,
    )  # fmt: skip
    return classify_response(outcome, state.model_name, request_id(request.scope))


def classify_response(outcome: Classification, model: str, rid: str) -> ClassifyResponse:
    """The response body for classified texts (batch-job lines share it)."""
    results = [ClassifyResult(**vars(r)) for r in outcome.results]
    usage = Usage(tokens=sum(r.tokens for r in results), chunks=sum(r.chunks for r in results))
    return ClassifyResponse(id=f"cls-{rid}", model=model, results=results, usage=usage)
