"""Prometheus metrics of one app: names, labels and bucket choices all live here.

Each app owns a CollectorRegistry, so tests and several apps in one process never collide.
Every series that can be known in advance is created at start-up, at zero.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.costmodel import CostModel

# Latencies run from a cached short text on a GPU (~1 ms) to a long document's many windows
# queued behind a busy CPU (tens of seconds).
SECONDS_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# Queue waits are often below a millisecond when the engine is idle.
QUEUE_BUCKETS = (0.0001, 0.0005, *SECONDS_BUCKETS)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Padded tokens per run: one short text up to a full batch of n_max windows.
BATCH_TOKEN_BUCKETS = tuple(float(2**i) for i in range(4, 18))  # 16 .. 131072
PADDING_RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

PRIORITIES = ("interactive", "batch")
REJECTION_REASONS = (
    "queue_full", "deadline", "too_large", "invalid", "unauthorized", "cancelled",
    "not_ready", "shutting_down", "engine_error",
)  # fmt: skip
BATCH_JOB_STATUSES = (
    "validating", "in_progress", "finalizing", "completed", "failed", "expired",
    "cancelling", "cancelled",
)  # fmt: skip
BATCH_JOB_OUTCOMES = ("succeeded", "failed")


class Metrics:
    """The service's metrics; code records where things happen by calling these directly."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "linmod_http_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "linmod_http_request_duration_seconds",
            "HTTP request duration.",
            ["route", "method"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "linmod_queue_wait_seconds",
            "Time a window waits in the queue before its batch runs.",
            ["priority"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.tokenize_duration = Histogram(
            "linmod_tokenize_duration_seconds",
            "Tokenizing the texts of one request.",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "linmod_inference_duration_seconds",
            "One engine run over one batch.",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "linmod_batch_size", "Windows per engine run.", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "linmod_batch_tokens",
            "Padded tokens (batch x longest) per engine run.",
            buckets=BATCH_TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_padding_ratio = Histogram(
            "linmod_batch_padding_ratio",
            "Pad tokens / padded tokens per engine run.",
            buckets=PADDING_RATIO_BUCKETS,
            registry=r,
        )
        self.documents = Counter("linmod_documents", "Documents classified.", registry=r)
        self.tokens = Counter("linmod_tokens", "Real (unpadded) tokens run.", registry=r)
        self.padded_tokens = Counter(
            "linmod_padded_tokens", "Padded tokens run (what the engine computed).", registry=r
        )
        self.chunks = Counter("linmod_chunks", "Windows documents were split into.", registry=r)
        self.queue_items = Gauge(
            "linmod_queue_items", "Windows waiting in the queue.", ["priority"], registry=r
        )
        self.queue_tokens = Gauge(
            "linmod_queue_tokens", "Tokens waiting in the queue.", ["priority"], registry=r
        )
        self.rejections = Counter(
            "linmod_rejections", "Requests refused or dropped, by reason.", ["reason"], registry=r
        )
        self.model_info = Gauge(
            "linmod_model_info",
            "The model being served (value 1).",
            ["model", "version", "provider", "precision"],
            registry=r,
        )
        self.batch_jobs = Gauge(
            "linmod_batch_jobs", "Batch jobs by status.", ["status"], registry=r
        )
        self.batch_job_lines = Counter(
            "linmod_batch_job_lines",
            "Batch-job input lines finished, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.batching = Gauge(
            "linmod_batching_enabled",
            "1 where the batching policy runs windows together, 0 where one per run.",
            ["model"],
            registry=r,
        )
        self.engine_cost = Gauge(
            "linmod_engine_cost_seconds",
            "Measured seconds of one engine run by batch size and padded length, times the "
            "live scale.",
            ["model", "batch", "length"],
            registry=r,
        )
        self.engine_cost_scale = Gauge(
            "linmod_engine_cost_scale",
            "Real runs' seconds over the calibration's prediction (exponential mean).",
            ["model"],
            registry=r,
        )
        self._model_series: dict[str, tuple[str, str, str, str]] = {}
        for priority in PRIORITIES:
            self.queue_wait.labels(priority)
            self.queue_items.labels(priority).set(0)
            self.queue_tokens.labels(priority).set(0)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)
        for status in BATCH_JOB_STATUSES:
            self.batch_jobs.labels(status).set(0)
        for outcome in BATCH_JOB_OUTCOMES:
            self.batch_job_lines.labels(outcome)

    def init_routes(self, routes: Iterable[tuple[str, str]]) -> None:
        """Create the (route, method) series so dashboards see them before any traffic."""
        for route, method in routes:
            self.http_duration.labels(route, method)
            self.http_requests.labels(route, method, "200")

    def set_model(self, model: str, version: str, provider: str, precision: str) -> None:
        """Record a model in use (one series at 1 per model: a new version replaces its old)."""
        old = self._model_series.pop(model, None)
        if old is not None:
            self.model_info.remove(*old)
        self._model_series[model] = (model, version, provider, precision)
        self.model_info.labels(model, version, provider, precision).set(1)

    def set_cost_model(self, model: str, cost: CostModel, batching: bool) -> None:
        """Publish a model's measured cost grid and the policy chosen from it."""
        self.batching.labels(model).set(1 if batching else 0)
        for (size, length), seconds in cost.points.items():
            self.engine_cost.labels(model, str(size), str(length)).set(seconds)
        self.engine_cost_scale.labels(model).set_function(lambda: cost.scale)

    def observe_batch(
        self, size: int, real_tokens: int, padded_tokens: int, seconds: float
    ) -> None:
        """Record one engine run."""
        self.batch_size.observe(size)
        self.batch_tokens.observe(padded_tokens)
        self.batch_padding_ratio.observe(1.0 - real_tokens / padded_tokens if padded_tokens else 0)
        self.tokens.inc(real_tokens)
        self.padded_tokens.inc(padded_tokens)
        self.inference_duration.observe(seconds)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
