"""POST /v1/moderations: the OpenAI moderation API, so OpenAI clients only change base_url."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import APIRouter, Depends, Request, Response

from service.classifier import Classification
from service.engine import ModelConfig
from service.inputs import extract_inputs, extraction_info
from service.mailtext import Extraction
from service.middleware import request_id
from service.routes.deps import ClassifierDep, StateDep, api_key, classify_texts, require_json
from service.schemas import ERROR_RESPONSES, Moderation, ModerationRequest, ModerationResponse

router = APIRouter(
    prefix="/v1",
    tags=["moderations"],
    dependencies=[Depends(api_key), Depends(require_json)],
    responses=ERROR_RESPONSES,
)


@router.post("/moderations", response_model=ModerationResponse)
async def moderations(
    body: ModerationRequest,
    request: Request,
    response: Response,
    state: StateDep,
    classifier: ClassifierDep,
) -> ModerationResponse:
    """Moderate each input; the categories are the model's flag labels. Email and HTML inputs
    report what was extracted from them."""
    texts, extractions = await extract_inputs(body.texts(), body.input_format, state.settings)
    outcome = await classify_texts(
        request, response, classifier, state.settings, texts,
        long_document=None, aggregation=None,
    )  # fmt: skip
    return moderation_response(
        outcome, classifier.config, state.model_name, request_id(request.scope), extractions
    )


def moderation_response(
    outcome: Classification,
    config: ModelConfig,
    model: str,
    rid: str,
    extractions: Sequence[Extraction | None] = (),
) -> ModerationResponse:
    """The response body for classified texts (batch-job lines share it)."""
    results = []
    found = list(extractions) or [None] * len(outcome.results)
    for result, extraction in zip(outcome.results, found, strict=True):
        scores = {label: result.scores[label] for label in config.flag_labels}
        results.append(
            Moderation(
                flagged=result.flagged,
                categories={label: s >= config.threshold for label, s in scores.items()},
                category_scores=scores,
                category_applied_input_types={label: ["text"] for label in scores},
                extraction=extraction_info(extraction),
            )
        )
    return ModerationResponse(id=f"modr-{rid}", model=model, results=results)
