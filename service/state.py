"""What a running app holds: settings, metrics and, once started, engine, batcher, classifier."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from fastapi import FastAPI

from service.batcher import DynamicBatcher
from service.classifier import Classifier
from service.engine import Engine
from service.metrics import Metrics
from service.settings import Settings

if TYPE_CHECKING:
    from service.jobs.store import JobStore
    from service.jobs.worker import JobWorker
    from service.models import ModelRegistry


def _set(event: asyncio.Event) -> asyncio.Event:
    event.set()
    return event


@dataclass
class ServiceState:
    """Shared by the lifespan, the routes and background services; kept on `app.state.linmod`."""

    settings: Settings
    metrics: Metrics
    engine: Engine | None = None
    batcher: DynamicBatcher | None = None
    classifier: Classifier | None = None
    ready: bool = False
    stopping: bool = False
    draining: bool = False  # SIGTERM came: /ready is 503
    refusing: bool = False  # and new work is refused (after the drain delay)
    inflight: int = 0  # requests being served, probes and scrapes aside
    # Set while no request is in flight: a drain that begins before any request arrives must not
    # wait out its whole grace period.
    idle: asyncio.Event = field(default_factory=lambda: _set(asyncio.Event()))
    warmup_s: float | None = None
    startup_error: str | None = None
    started_at: float = field(default_factory=time.time)
    # Path prefix -> body limit in bytes, over settings.max_body_bytes (e.g. file uploads).
    body_limits: dict[str, int] = field(default_factory=dict)
    store: JobStore | None = None  # the batch-job store, when settings.jobs (lifespan opens it)
    models: ModelRegistry | None = None  # every model served, by id
    jobs: JobWorker | None = None  # the batch-jobs worker, when settings.jobs

    @property
    def model_name(self) -> str:
        """The name responses report for the model."""
        if self.models is not None and self.models.default_id:
            return self.models.default_id
        if self.settings.served_model_name:
            return self.settings.served_model_name
        return self.engine.config.name if self.engine else "unknown"


class BackgroundService(Protocol):
    """Something the lifespan starts after the batcher and stops before it (a jobs worker)."""

    async def start(self, state: ServiceState) -> None:
        """Begin work; called once the classifier exists (warm-up may still be running)."""
        ...

    async def stop(self) -> None:
        """Finish or hand back in-flight work; the batcher still runs meanwhile."""
        ...


def get_state(app: FastAPI) -> ServiceState:
    """The state `create_app` attached to this app."""
    state = app.state.linmod
    if not isinstance(state, ServiceState):
        raise RuntimeError("app was not built by service.app.create_app")
    return state
