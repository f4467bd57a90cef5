"""What callers of the dynamic batcher deal in: priorities, batching limits, results, errors."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

import numpy as np

from service.artifact import FloatArray, IntArray
from service.costmodel import BatchingMode, CostModel


class Priority(enum.IntEnum):
    """Lower runs first."""

    INTERACTIVE = 0
    BATCH = 1

    @property
    def label(self) -> str:
        """The metric label value."""
        return self.name.lower()


@dataclass(frozen=True)
class BatcherConfig:
    """Batch forming and admission limits (see Settings for their meaning)."""

    max_batch_tokens: int = 16384
    max_batch_size: int = 32
    max_wait_s: float = 0.005
    max_queue_items: int = 1024
    max_queue_tokens: int = 1_048_576
    max_job_items: int = 256
    # A window joins a batch only while real tokens stay at least this share of padded tokens:
    # on a CPU an engine run costs what its padded tokens cost.
    min_batch_fill: float = 0.85
    # Padded tokens of a batch of batch-job windows: an interactive request arriving while one
    # runs waits for it, so it is kept short.
    max_job_batch_tokens: int = 4096
    # auto: measure the engine at warm-up and batch only where batching pays; on; off.
    batching: BatchingMode = "auto"
    # On an idle server, a lone window predicted to run within this long runs on the event
    # loop's own thread: no hop to an engine thread and back. 0: never.
    inline_run_s: float = 0.02


@dataclass(frozen=True)
class SubmitResult:
    """Logits of the submitted windows and where their time went."""

    logits: FloatArray
    queue_s: float  # longest wait of any window before its batch was formed
    inference_s: float  # engine time of the batches its windows ran in
    batches: int


class BatcherError(Exception):
    """Base of the errors `submit` raises."""


class QueueFullError(BatcherError):
    """No room for the whole request; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTooLargeError(BatcherError):
    """A request that alone is over an admission budget, so it can never be admitted."""


class DeadlineExceededError(BatcherError):
    """The deadline passed before every window had run."""


class BatchFailedError(BatcherError):
    """The engine raised on a batch that held one of the request's windows."""


class BatcherClosedError(BatcherError):
    """The batcher is shutting down and takes no new work."""


class PendingRequest:
    """One submitted request: its logits fill in as its windows run."""

    __slots__ = ("batches", "future", "inference_s", "logits", "priority", "queue_s", "remaining")

    def __init__(self, n: int, num_labels: int, priority: Priority, future: asyncio.Future[None]):
        self.future = future
        self.priority = priority
        self.logits = np.zeros((n, num_labels), dtype=np.float32)
        self.remaining = n
        self.queue_s = 0.0
        self.inference_s = 0.0
        self.batches = 0

    @property
    def done(self) -> bool:
        return self.future.done()


@dataclass(eq=False)
class QueuedWindow:
    """One window of a request, waiting in the queue."""

    request: PendingRequest
    index: int
    ids: IntArray
    enqueued: float
    # Its place in the queue: when it came, less its predicted run time (`DynamicBatcher`).
    order: float = 0.0

    @property
    def length(self) -> int:
        return int(self.ids.size)


def select_batch(
    anchor: QueuedWindow, pending: list[QueuedWindow], config: BatcherConfig, cost: CostModel
) -> list[QueuedWindow]:
    """The anchor (the oldest window of the first priority), then the windows of `pending` (its
    priority's queue) closest to it in length that fit.

    Anchoring on the oldest keeps the queue fair; choosing neighbours by length, and only while
    real tokens stay `min_batch_fill` of padded ones, keeps padding small. Windows of one
    priority share a batch: batch-job windows never lengthen an interactive run.
    """
    budget = config.max_batch_tokens
    if anchor.request.priority is not Priority.INTERACTIVE:
        budget = max(min(budget, config.max_job_batch_tokens), anchor.length)
    selected, longest, real = [anchor], anchor.length, anchor.length
    candidates = [i for i in pending if i is not anchor]
    candidates.sort(key=lambda i: abs(i.length - anchor.length))  # stable: age breaks ties
    for item in candidates:
        if len(selected) == config.max_batch_size:
            break
        grown = max(longest, item.length)
        padded = grown * (len(selected) + 1)
        if padded <= budget and real + item.length >= config.min_batch_fill * padded:
            selected.append(item)
            longest, real = grown, real + item.length
    if cost.points and len(selected) > 1:
        # Of what fits, the prefix with the most windows per predicted second.
        selected = selected[: cost.best_size([i.length for i in selected])]
    return selected


def deliver(batch: list[QueuedWindow], logits: FloatArray, seconds: float) -> None:
    """Each window's logits to its request; a request whose windows have all run is answered."""
    touched: set[int] = set()
    for row, item in enumerate(batch):
        request = item.request
        if request.done:
            continue
        request.logits[item.index] = logits[row]
        request.remaining -= 1
        if id(request) not in touched:
            touched.add(id(request))
            request.inference_s += seconds
            request.batches += 1
        if request.remaining == 0:
            request.future.set_result(None)
