"""The models a process serves: each with its own engine session, batcher queue and classifier,
all sharing the tokenizer's admission budget; picked by name, reloaded without a failed request.

A reload loads and warms a new version beside the old one, moves traffic to it in one step,
then retires the old one once the requests holding it have finished (it drains).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from service.admission import CharGate
from service.artifact import CONFIG_FILE, MODEL_FILES, TOKENIZER_FILE, ArtifactConfig
from service.batcher import BatcherConfig, DynamicBatcher
from service.classifier import Classifier
from service.documents import DocumentEncoder
from service.engine import Engine, EngineError, OnnxEngine, warmup, warmup_shapes
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)


class UnknownModelError(LookupError):
    """A request named a model this process does not serve."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"model {name!r} is not served here; known models: {', '.join(known)}")
        self.name = name
        self.known = known


@dataclass
class ServedModel:
    """One loaded artifact version and what serves it."""

    id: str
    directory: Path | None
    fingerprint: str
    engine: Engine
    batcher: DynamicBatcher
    classifier: Classifier
    created: int = field(default_factory=lambda: int(time.time()))
    leases: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def config(self) -> ArtifactConfig:
        """The artifact's config.json."""
        return self.engine.config

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[ServedModel]:
        """Hold this version while a request uses it: a reload retires it only once released."""
        self.leases += 1
        self.idle.clear()
        try:
            yield self
        finally:
            self.leases -= 1
            if self.leases == 0:
                self.idle.set()

    async def close(self, timeout: float) -> None:
        """Wait for its requests (at most `timeout` s), drain the batcher, release the engine."""
        if self.leases:
            try:
                async with asyncio.timeout(timeout):
                    await self.idle.wait()
            except TimeoutError:
                log.warning("model retired with requests in flight", extra={"model": self.id})
        await self.batcher.close(timeout=timeout)
        self.classifier.close()
        self.engine.close()


def fingerprint(directory: Path) -> str:
    """What changes when an artifact folder is replaced: its files' sizes and times."""
    parts = []
    for name in (CONFIG_FILE, TOKENIZER_FILE, *MODEL_FILES.values()):
        path = directory / name
        if path.is_file():
            st = path.stat()
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}")
    return "|".join(parts)


def model_dirs(settings: Settings) -> list[Path]:
    """The artifact folders to serve: --model-dir (repeated), then each sub-folder of
    --model-repository holding a config.json, in name order."""
    found = [settings.model_dir, *settings.model_dirs]
    if settings.model_repository is not None:
        root = settings.model_repository
        if root.is_dir():
            found += sorted(p for p in root.iterdir() if (p / CONFIG_FILE).is_file())
    unique: list[Path] = []
    for path in found:
        if path not in unique:
            unique.append(path)
    return unique


class ModelRegistry:
    """The served models by id, the default one, and their loading, swapping and retiring."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.gate = CharGate(settings.max_tokenize_chars)  # shared: one tokenizer budget
        self.models: dict[str, ServedModel] = {}
        self.default_id = ""
        self.last_reload: dict[str, object] | None = None
        self._reloading = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self.on_change: Callable[[], None] = lambda: None

    def get(self, name: str | None) -> ServedModel:
        """The model a request names (or the default); UnknownModelError if none is served so."""
        if not name:
            return self.models[self.default_id]
        found = self.models.get(name)
        if found is None:
            raise UnknownModelError(name, sorted(self.models))
        return found

    def _model_id(self, config: ArtifactConfig, directory: Path | None) -> str:
        s = self.settings
        if s.served_model_name and (directory is None or directory == s.model_dir):
            return s.served_model_name
        return config.name

    def load(self, directory: Path | None, engine: Engine | None = None) -> ServedModel:
        """Load an artifact (blocking: call it from a thread) with its batcher unstarted."""
        s = self.settings
        if engine is None:
            assert directory is not None
            engine = OnnxEngine.load(
                directory,
                device=s.device,
                precision=s.precision,
                intra_op_threads=s.intra_op_threads,
                inter_op_threads=s.inter_op_threads,
                workers=s.engine_workers,
                allow_spinning=s.ort_allow_spinning,
            )
        model_dir = directory if directory is not None else s.model_dir
        config = engine.config
        try:
            encoder = DocumentEncoder.from_file(model_dir / TOKENIZER_FILE)
        except Exception as exc:  # tokenizers raises plain Exceptions
            raise EngineError(f"cannot load {model_dir / TOKENIZER_FILE}: {exc}") from exc
        # The default matches how the model's evaluation scores long documents.
        overlap = s.chunk_overlap if s.chunk_overlap is not None else min(256, config.n_max // 4)
        if overlap >= config.n_max:
            raise EngineError(
                f"chunk_overlap={overlap} must be below the model's n_max={config.n_max}"
            )
        batching = BatcherConfig(
            max_batch_tokens=max(s.max_batch_tokens, config.n_max),  # a full window must fit
            max_batch_size=s.max_batch_size,
            max_wait_s=s.max_wait_ms / 1000,
            max_queue_items=s.max_queue_items,
            max_queue_tokens=s.max_queue_tokens,
            max_job_items=s.max_job_items,
            min_batch_fill=s.min_batch_fill,
            max_job_batch_tokens=s.max_job_batch_tokens,
            batching=s.batching,
            inline_run_s=s.inline_run_ms / 1000,
        )
        model_id = self._model_id(config, directory)
        batcher = DynamicBatcher(engine, self.metrics, batching)
        classifier = Classifier(
            encoder, batcher, self.metrics, config,
            chunk_overlap=overlap, aggregation=s.chunk_aggregation,
            tokenizer_threads=s.tokenizer_threads, max_tokenize_chars=s.max_tokenize_chars,
            evidence_segments=s.evidence_segments, gate=self.gate,
            inline_tokenize_chars=s.inline_tokenize_chars,
        )  # fmt: skip
        return ServedModel(model_id, directory, fingerprint(model_dir), engine, batcher, classifier)

    def warm(self, model: ServedModel) -> float:
        """Run the model's representative shapes (blocking); seconds taken."""
        s = self.settings
        if not s.warmup:
            return 0.0
        shapes = warmup_shapes(model.config.n_max, s.max_batch_tokens, s.max_batch_size)
        seconds = warmup(model.engine, shapes)
        policy = model.batcher.calibrate()
        self.metrics.set_cost_model(model.id, model.batcher.cost, policy.batching)
        log.info(
            "warm-up done",
            extra={"model": model.id, "seconds": round(seconds, 3), "batching": policy.batching,
                   "why": policy.reason,
                   "calibration_seconds": round(model.batcher.cost.calibration_s, 3)},
        )  # fmt: skip
        return seconds + model.batcher.cost.calibration_s

    async def add(self, model: ServedModel) -> ServedModel | None:
        """Start its batcher and route its id to it; returns the version it replaced."""
        await model.batcher.start()
        old = self.models.get(model.id)
        self.models[model.id] = model
        if not self.default_id:
            self.default_id = self.settings.default_model or model.id
        self.metrics.set_model(
            model.id, model.config.version, model.engine.provider, model.engine.precision
        )
        self.on_change()
        log.info(
            "model serving",
            extra={"model": model.id, "version": model.config.version,
                   "provider": model.engine.provider, "precision": model.engine.precision},
        )  # fmt: skip
        return old

    async def reload(self) -> dict[str, object]:
        """Load what is new or changed in the model folders, warm it, swap it in, drain the
        old version; a folder that fails to load keeps its old version serving."""
        async with self._reloading:
            report: dict[str, list[str]] = {
                "loaded": [], "replaced": [], "unchanged": [], "removed": [], "failed": [],
            }  # fmt: skip
            serving_dirs = {m.directory: m for m in self.models.values()}
            wanted = model_dirs(self.settings)
            for directory in wanted:
                current = serving_dirs.get(directory)
                if current is not None and current.fingerprint == fingerprint(directory):
                    report["unchanged"].append(current.id)
                    continue
                try:
                    model = await asyncio.to_thread(self.load, directory)
                    await asyncio.to_thread(self.warm, model)
                except Exception as exc:
                    log.exception("reload failed", extra={"directory": str(directory)})
                    report["failed"].append(f"{directory}: {exc}")
                    continue
                old = await self.add(model)
                if current is not None and current.id != model.id:
                    # The folder now holds another model: the one it held leaves.
                    self.models.pop(current.id, None)
                    report["removed"].append(current.id)
                    self._retire_later(current)
                if old is not None:
                    report["replaced"].append(model.id)
                    self._retire_later(old)
                else:
                    report["loaded"].append(model.id)
            for folder, gone in serving_dirs.items():
                if folder is not None and folder not in wanted and gone.id != self.default_id:
                    self.models.pop(gone.id, None)
                    report["removed"].append(gone.id)
                    self._retire_later(gone)
            self.on_change()
            self.last_reload = {"at": time.time(), **report}
            log.info("models reloaded", extra=report)
            return self.last_reload

    def _retire_later(self, model: ServedModel) -> None:
        task = asyncio.create_task(self._retire(model), name=f"linmod-retire-{model.id}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, model: ServedModel) -> None:
        await model.close(self.settings.shutdown_timeout_s)
        log.info("old model version drained", extra={"model": model.id})

    async def close(self) -> None:
        """Drain and release every model, retiring versions included."""
        if self._retiring:
            await asyncio.wait(set(self._retiring))
        for model in list(self.models.values()):
            await model.close(self.settings.shutdown_timeout_s)
        self.models.clear()
