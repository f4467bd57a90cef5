"""The FastAPI app: `create_app` wires routes, errors and metrics; its lifespan starts and stops
the engine, batcher, classifier and any background services (such as a batch-jobs worker).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute

from service import __version__
from service.artifact import TOKENIZER_FILE
from service.auth import ApiKeyMiddleware
from service.batcher import BatcherConfig, DynamicBatcher
from service.classifier import Classifier
from service.documents import DocumentEncoder
from service.drain import InflightMiddleware
from service.engine import Engine, EngineError, OnnxEngine, warmup, warmup_shapes
from service.errors import install_error_handlers
from service.jobs.store import open_store
from service.jobs.upload import UPLOAD_OVERHEAD
from service.jobs.worker import JobWorker
from service.metrics import Metrics
from service.middleware import (
    BodyAdmissionMiddleware,
    BodyLimitMiddleware,
    RequestContextMiddleware,
)
from service.routes import batches, classify, files, moderations, ops
from service.settings import Settings, get_settings
from service.state import BackgroundService, ServiceState, get_state

log = logging.getLogger(__name__)

CLASSIFY_PATHS = frozenset({"/v1/classify", "/v1/moderations"})
SMALL_BODY_BYTES = 64 * 1024  # bodies up to this size skip the in-flight bytes budget


def _load_engine(settings: Settings) -> Engine:
    return OnnxEngine.load(
        settings.model_dir,
        device=settings.device,
        precision=settings.precision,
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
    )


async def _warm_up(state: ServiceState) -> None:
    assert state.engine is not None
    s = state.settings
    try:
        if s.warmup:
            shapes = warmup_shapes(state.engine.config.n_max, s.max_batch_tokens, s.max_batch_size)
            state.warmup_s = await asyncio.to_thread(warmup, state.engine, shapes)
            log.info("warm-up done", extra={"seconds": round(state.warmup_s, 3), "shapes": shapes})
    except Exception as exc:
        # /ready stays 503 and says why; the process lives on so the reason can be read.
        state.startup_error = f"warm-up failed: {exc}"
        log.exception("warm-up failed")
        return
    state.ready = True


async def start(state: ServiceState, engine: Engine | None) -> None:
    """Load (unless given) the engine, then start the batcher and classifier."""
    s = state.settings
    if engine is None:
        engine = await asyncio.to_thread(_load_engine, s)
    state.engine = engine
    config = engine.config
    try:
        encoder = DocumentEncoder.from_file(s.model_dir / TOKENIZER_FILE)
    except Exception as exc:  # tokenizers raises plain Exceptions
        raise EngineError(f"cannot load {s.model_dir / TOKENIZER_FILE}: {exc}") from exc
    # The default matches how the model's evaluation scores long documents.
    overlap = s.chunk_overlap if s.chunk_overlap is not None else min(256, config.n_max // 4)
    if overlap >= config.n_max:
        raise EngineError(f"chunk_overlap={overlap} must be below the model's n_max={config.n_max}")
    batching = BatcherConfig(
        max_batch_tokens=max(s.max_batch_tokens, config.n_max),  # a full window must fit
        max_batch_size=s.max_batch_size,
        max_wait_s=s.max_wait_ms / 1000,
        max_queue_items=s.max_queue_items,
        max_queue_tokens=s.max_queue_tokens,
        max_job_items=s.max_job_items,
        min_batch_fill=s.min_batch_fill,
        max_job_batch_tokens=s.max_job_batch_tokens,
    )
    state.batcher = DynamicBatcher(engine, state.metrics, batching)
    await state.batcher.start()
    state.classifier = Classifier(
        encoder, state.batcher, state.metrics, config,
        chunk_overlap=overlap, aggregation=s.chunk_aggregation,
        tokenizer_threads=s.tokenizer_threads, max_tokenize_chars=s.max_tokenize_chars,
        evidence_segments=s.evidence_segments,
    )  # fmt: skip
    state.metrics.set_model(config.name, config.version, engine.provider, engine.precision)
    log.info(
        "engine ready for warm-up",
        extra={"model": config.name, "version": config.version, "provider": engine.provider,
               "precision": engine.precision, "n_max": config.n_max},
    )  # fmt: skip


async def stop(state: ServiceState) -> None:
    """Drain the batcher, then release the classifier and engine."""
    if state.batcher is not None:
        await state.batcher.close(timeout=state.settings.shutdown_timeout_s)
    if state.classifier is not None:
        state.classifier.close()
    if state.engine is not None:
        state.engine.close()


def create_app(
    settings: Settings,
    engine: Engine | None = None,
    *,
    services: Sequence[BackgroundService] = (),
) -> FastAPI:
    """An app serving the model in `settings.model_dir` (or `engine`, e.g. a FakeEngine).

    `services` are started after the classifier exists and stopped before the batcher drains;
    with `settings.jobs` the batch-jobs worker is one of them, and /v1/files and /v1/batches
    are served.
    """
    metrics = Metrics()
    state = ServiceState(settings=settings, metrics=metrics)
    if settings.jobs:
        state.jobs = JobWorker(settings)
        services = [*services, state.jobs]
        state.body_limits["/v1/files"] = settings.job_max_file_bytes + UPLOAD_OVERHEAD

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = get_state(app)
        await start(state, engine)
        warming = asyncio.create_task(_warm_up(state), name="linmod-warmup")
        started: list[BackgroundService] = []
        try:
            if state.jobs is not None:
                # One clock for the store and its worker (tests move it).
                state.store = await open_store(settings.database_url, clock=state.jobs.clock)
                log.info("job store open", extra={"database": state.store.db.url})
            for service in services:
                await service.start(state)
                started.append(service)
            yield
        finally:
            state.ready, state.stopping = False, True
            warming.cancel()
            for service in reversed(started):
                await service.stop()
            if state.store is not None:
                await asyncio.to_thread(state.store.db.close)
            await stop(state)

    app = FastAPI(
        title="Linmod",
        summary="Content moderation with a Linformer classifier: long documents, dynamic batching",
        version=__version__,
        lifespan=lifespan,
    )
    app.state.linmod = state
    # The last added runs first: ids and timing wrap everything, the body limit included.
    app.add_middleware(
        BodyLimitMiddleware,
        limit=settings.max_body_bytes,
        metrics=metrics,
        overrides=state.body_limits,
    )
    app.add_middleware(
        BodyAdmissionMiddleware,
        paths=CLASSIFY_PATHS,
        limit=settings.max_inflight_body_bytes,
        small=SMALL_BODY_BYTES,
        metrics=metrics,
    )
    # Keys are checked before any route reads the body: no key, 401, whatever the body is.
    app.add_middleware(ApiKeyMiddleware, settings=settings, metrics=metrics)
    app.add_middleware(InflightMiddleware, state=state)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    install_error_handlers(app)
    for module in (ops, classify, moderations):
        app.include_router(module.router)
    if settings.jobs:
        app.include_router(files.router)
        app.include_router(batches.router)
    metrics.init_routes(
        (route.path, method)
        for route in app.routes
        if isinstance(route, APIRoute)
        for method in sorted(route.methods or ())
    )
    return app


def app_from_env() -> FastAPI:
    """For `uvicorn --factory service.app:app_from_env`: settings from LINMOD_* variables."""
    return create_app(get_settings())
