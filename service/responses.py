"""What /v1/classify and /v1/moderations answer, wherever a request is served (a route, or a
batch-job line): the request limits and the response bodies. Routes and jobs both import it.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import Response
from pydantic import BaseModel

from service.artifact import ArtifactConfig
from service.classifier import Classification
from service.errors import ApiError
from service.inputs import extraction_info
from service.mailtext import Extraction
from service.models import ModelRegistry, ServedModel, UnknownModelError
from service.schemas import (
    ClassifyResponse,
    ClassifyResult,
    Evidence,
    Moderation,
    ModerationResponse,
    Usage,
)
from service.settings import Settings

OPENAI_MODERATION_MODELS = ("omni-moderation-", "text-moderation-")


def served_model(
    models: ModelRegistry, name: str | None, *, openai_moderation: bool = False
) -> ServedModel:
    """The model a request names (or the default), or 404 listing the models served. On the
    moderation endpoint OpenAI's own model names (omni-moderation-latest, text-moderation-*),
    which OpenAI clients send unchanged, mean the default model."""
    openai_name = bool(name) and str(name).startswith(OPENAI_MODERATION_MODELS)
    if openai_moderation and openai_name and name not in models.models:
        name = None
    try:
        return models.get(name)
    except UnknownModelError as exc:
        raise ApiError(404, str(exc), code="model_not_found", reason="invalid") from exc


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


def classify_response(
    outcome: Classification,
    model: str,
    rid: str,
    extractions: Sequence[Extraction | None] = (),
) -> ClassifyResponse:
    """The response body for classified texts (batch-job lines share it); with evidence, an
    extraction carries its text, which the evidence offsets index."""
    found = list(extractions) or [None] * len(outcome.results)
    results = []
    for r, e in zip(outcome.results, found, strict=True):
        extraction = extraction_info(e)
        evidence = None
        if r.evidence is not None:
            evidence = [Evidence(**vars(item)) for item in r.evidence]
            if extraction is not None and e is not None:
                extraction.text = e.text
        fields = {**vars(r), "evidence": evidence}
        results.append(ClassifyResult(**fields, extraction=extraction))
    usage = Usage(tokens=sum(r.tokens for r in results), chunks=sum(r.chunks for r in results))
    if any(r.evidence is not None for r in results):
        usage.evidence_windows = outcome.evidence_windows
        usage.evidence_tokens = outcome.evidence_tokens
    return ClassifyResponse(id=f"cls-{rid}", model=model, results=results, usage=usage)


def moderation_response(
    outcome: Classification,
    config: ArtifactConfig,
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


def json_body(model: BaseModel, response: Response) -> Response:
    """`model` as the JSON response, with the headers a route set on `response`: the body is
    built once, by pydantic's serializer, instead of FastAPI validating the returned model
    against the route's response model again."""
    return Response(
        model.model_dump_json(by_alias=True),
        media_type="application/json",
        headers=dict(response.headers),
    )
