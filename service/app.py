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
from service.auth import ApiKeyMiddleware
from service.drain import InflightMiddleware
from service.engine import Engine, EngineError
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
from service.models import ModelRegistry, model_dirs
from service.routes import batches, classify, files, models, moderations, ops, playground
from service.settings import Settings, get_settings
from service.state import BackgroundService, ServiceState, get_state

log = logging.getLogger(__name__)

CLASSIFY_PATHS = frozenset({"/v1/classify", "/v1/moderations"})
SMALL_BODY_BYTES = 64 * 1024  # bodies up to this size skip the in-flight bytes budget


async def _warm_up(state: ServiceState) -> None:
    models = state.models
    assert models is not None
    try:
        seconds = 0.0
        for model in list(models.models.values()):
            seconds += await asyncio.to_thread(models.warm, model)
        state.warmup_s = seconds
    except Exception as exc:
        # /ready stays 503 and says why; the process lives on so the reason can be read.
        state.startup_error = f"warm-up failed: {exc}"
        log.exception("warm-up failed")
        return
    state.ready = True


def _follow_default(state: ServiceState) -> None:
    """Keep state.engine, batcher and classifier on the default model (for /info and jobs)."""
    assert state.models is not None
    default = state.models.models.get(state.models.default_id)
    if default is not None:
        state.engine, state.batcher = default.engine, default.batcher
        state.classifier = default.classifier


async def start(state: ServiceState, engine: Engine | None) -> None:
    """Load every model (the first from `engine` when given) and start their batchers."""
    s = state.settings
    models = ModelRegistry(s, state.metrics)
    state.models = models
    models.on_change = lambda: _follow_default(state)
    directories = model_dirs(s)
    for i, directory in enumerate(directories):
        given = engine if i == 0 else None
        model = await asyncio.to_thread(models.load, directory, given)
        if model.id in models.models:
            raise EngineError(
                f"two model folders serve the model id {model.id!r}: give each its own name"
            )
        await models.add(model)
    if s.default_model and s.default_model not in models.models:
        raise EngineError(
            f"default_model {s.default_model!r} is not among the models served: "
            f"{', '.join(sorted(models.models))}"
        )


async def stop(state: ServiceState) -> None:
    """Drain every model's batcher, then release its classifier and engine."""
    if state.models is not None:
        await state.models.close()


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
        refusal_delay_s=settings.large_body_refusal_delay_ms / 1000,
    )
    # Keys are checked before any route reads the body: no key, 401, whatever the body is.
    app.add_middleware(ApiKeyMiddleware, settings=settings, metrics=metrics)
    app.add_middleware(InflightMiddleware, state=state)
    app.add_middleware(
        RequestContextMiddleware, metrics=metrics, access_log_sample=settings.access_log_sample
    )
    install_error_handlers(app)
    # The hot routes first: the router tries routes in order (about 50 us a request here).
    for module in (classify, moderations, ops, models, playground):
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
