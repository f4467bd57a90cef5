"""What callers of the dynamic batcher deal in: priorities, batching limits, results, errors."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

import numpy as np

from service.artifact import FloatArray, IntArray
from service.costmodel import BatchingMode


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

    @property
    def length(self) -> int:
        return int(self.ids.size)
