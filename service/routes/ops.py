"""Operations endpoints: /health, /ready, /info and /metrics (never behind an API key)."""

from __future__ import annotations

import dataclasses
import platform
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service import __version__
from service.batcher import DynamicBatcher
from service.engine import Engine
from service.errors import error_body
from service.routes.deps import StateDep

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is up (the model may still be loading)."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "loading, warming up or stopping"}})
async def ready(state: StateDep) -> Response:
    """200 once the model is loaded and warmed up; 503 before that and while stopping."""
    stopping = state.stopping or state.draining
    if state.ready and not stopping:
        return JSONResponse({"status": "ready"})
    message = "the server is shutting down" if stopping else "the model is not ready yet"
    code = "shutting_down" if stopping else "not_ready"
    if state.startup_error:
        # The reason is in the server's log; an unauthenticated probe learns only that it failed.
        message, code = "the model failed to start; the server's log says why", "startup_failed"
    body = error_body(message, "service_unavailable", code)
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})


@router.get("/info")
async def info(state: StateDep) -> dict[str, Any]:
    """The model, the runtime really in use, and the batching and request limits."""
    s = state.settings
    engine = state.engine
    classifier = state.classifier
    model: dict[str, Any] = engine.config.model_dump() if engine else {}
    return {
        "model": {**model, "served_name": state.model_name},
        "runtime": {
            "provider": engine.provider if engine else None,
            "precision": engine.precision if engine else None,
            "device": s.device,
            "versions": _versions(),
        },
        "batching": _batching(state.batcher, engine),
        "long_document": {
            "policy": s.long_document,
            "chunk_overlap": classifier.chunk_overlap if classifier else s.chunk_overlap,
            "aggregation": s.chunk_aggregation,
        },
        "limits": {
            "max_chars": s.max_chars,
            "max_inputs": s.max_inputs,
            "max_body_bytes": s.max_body_bytes,
            "request_timeout_s": s.request_timeout_s,
        },
        "models": sorted(state.models.models) if state.models else [],
        "auth": bool(s.api_keys),
        "ready": state.ready,
        "warmup_s": state.warmup_s,
        "started_at": state.started_at,
    }


def _batching(batcher: DynamicBatcher | None, engine: Engine | None) -> dict[str, Any] | None:
    """The limits, the engine's measured cost grid and the policy chosen from it."""
    if batcher is None:
        return None
    return {
        **dataclasses.asdict(batcher.config),
        "engine_workers": engine.workers if engine else None,
        "policy": {"batching": batcher.policy.batching, "reason": batcher.policy.reason},
        "cost_model": batcher.cost.describe(),
    }


@router.get("/metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    """Prometheus text exposition."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _versions() -> dict[str, str]:
    versions = {"linmod": __version__, "python": platform.python_version()}
    try:
        import onnxruntime

        versions["onnxruntime"] = str(onnxruntime.__version__)
    except ImportError:  # a fake engine needs no runtime
        pass
    return versions
