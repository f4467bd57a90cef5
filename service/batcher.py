"""Dynamic batching: a priority queue of token windows, and the tasks that make engine runs of it.

Pure asyncio, no HTTP. A caller (a route, the batch-jobs worker) submits one request's windows,
admitted all or none, and gets their logits [len(windows), num_labels] in order:

    result = await batcher.submit(windows, priority=Priority.BATCH, deadline=loop.time() + 600,
                                  wait_for_room=True)

Within a priority, windows wait in the order they were queued, less each window's predicted
run time (the cost model's): a window that will run long starts up to that long ahead of
windows that came just before it, so that its run overlaps their wait instead of adding to the
tail. Under 32 clients this keeps p99 nearer p50 (bench/ANALYSIS.md); a lone window, or a queue
of windows of one length, is first come, first served.

`submit` raises QueueFullError (`retry_after` seconds), DeadlineExceededError, BatchFailedError
(the engine failed on a batch holding one of its windows) or BatcherClosedError. Interactive
windows go first; batch-job windows fill the room left and are bounded apart (`max_job_items`
queued or running); with `wait_for_room=True` a job waits for room instead of being refused.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import queue
import threading
from collections.abc import Sequence

from service.artifact import IntArray
from service.costmodel import BatchingPolicy, CostModel
from service.engine import Engine
from service.engineruns import EngineRuns, Handoff
from service.metrics import Metrics
from service.queueing import (
    BatcherClosedError,
    BatcherConfig,
    BatcherError,
    BatchFailedError,
    DeadlineExceededError,
    PendingRequest,
    Priority,
    QueuedWindow,
    QueueFullError,
    RequestTooLargeError,
    SubmitResult,
    select_batch,
)

__all__ = [
    "BatchFailedError",
    "BatcherClosedError",
    "BatcherConfig",
    "BatcherError",
    "DeadlineExceededError",
    "DynamicBatcher",
    "Priority",
    "QueueFullError",
    "RequestTooLargeError",
    "SubmitResult",
]

log = logging.getLogger(__name__)


def _queue_order(item: QueuedWindow) -> float:
    return item.order


class DynamicBatcher(EngineRuns):
    """Owns the queue: one task forms batches; `engine.workers` engine threads take them from the
    hand-off queue and run them. Until `calibrate` has measured the engine, `auto` batching
    behaves as `on`."""

    def __init__(self, engine: Engine, metrics: Metrics, config: BatcherConfig) -> None:
        self._engine = engine
        self._metrics = metrics
        self.config = config
        self._n_max = engine.config.n_max
        self._num_labels = len(engine.config.labels)
        self._pending: dict[Priority, list[QueuedWindow]] = {p: [] for p in Priority}
        self._tokens: dict[Priority, int] = dict.fromkeys(Priority, 0)
        self._job_items = 0  # batch-job windows queued or running
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()
        self._ready: queue.SimpleQueue[Handoff] = queue.SimpleQueue()
        self._workers = max(1, engine.workers)
        self._idle = self._workers  # engine threads free, less batches handed and not yet run
        self.incoming = 0  # requests being tokenized for this batcher: more windows on the way
        self.cost = CostModel()
        self.policy = BatchingPolicy(config.batching, config.batching != "off", "not calibrated")
        self._run_seconds = 0.05  # running mean of a batch's engine time, for Retry-After
        self._closing = False
        self._live: set[PendingRequest] = set()  # admitted, not yet answered
        self._tasks: list[asyncio.Task[None]] = []
        self._threads: list[threading.Thread] = []
        self._stopped: list[asyncio.Future[None]] = []
        self._direct: set[asyncio.Future[None]] = set()  # runs started by `submit` itself

    async def start(self) -> None:
        """Start the forming task and the engine threads."""
        self._tasks = [asyncio.create_task(self._form_loop(), name="linmod-batch-former")]
        self._start_threads(asyncio.get_running_loop())

    def calibrate(self, budget_s: float = 30.0) -> BatchingPolicy:
        """Time the engine over batch shapes and choose the policy (blocking: before serving,
        from a thread)."""
        cfg = self.config
        self.cost = CostModel.calibrate(
            self._engine.run, self._engine.config.pad_id, n_max=self._n_max,
            max_batch_tokens=cfg.max_batch_tokens, max_batch_size=cfg.max_batch_size,
            budget_s=budget_s,
        )  # fmt: skip
        self.policy = self.cost.policy(cfg.batching)
        return self.policy

    def note_incoming(self, delta: int) -> None:
        """A caller starts (+1) or ends (-1) tokenizing a request bound for this queue."""
        self.incoming += delta
        if self.incoming <= 0:
            self.incoming = 0
            self._nudge()  # a partial batch waiting for it may leave now

    def idle(self, requests: int = 0) -> bool:
        """Nothing queued or running, and at most `requests` requests on their way."""
        return (
            self._idle == self._workers
            and self.incoming <= requests
            and not any(self._pending.values())
        )

    def _nudge(self) -> None:
        """Wake the forming task, if it has anything to form (submit and close wake it too)."""
        if self._closing or any(self._pending.values()):
            self._wakeup.set()

    def queued(self, priority: Priority) -> tuple[int, int]:
        """(windows, tokens) waiting at this priority."""
        return len(self._pending[priority]), self._tokens[priority]

    async def submit(
        self,
        windows: Sequence[IntArray],
        *,
        priority: Priority = Priority.INTERACTIVE,
        deadline: float | None = None,
        wait_for_room: bool = False,
    ) -> SubmitResult:
        """Classify token windows; `deadline` is in the running loop's time() clock."""
        if self._closing:
            raise BatcherClosedError("the service is shutting down")
        for window in windows:
            if not 0 < window.size <= self._n_max:
                raise ValueError(f"a window must have 1 to {self._n_max} tokens, not {window.size}")
        loop = asyncio.get_running_loop()
        request = PendingRequest(len(windows), self._num_labels, priority, loop.create_future())
        if not windows:
            return SubmitResult(request.logits, 0.0, 0.0, 0)
        try:
            async with asyncio.timeout_at(deadline):
                await self._admit(request, windows, wait_for_room)
                self._live.add(request)
                request.future.add_done_callback(lambda _: self._live.discard(request))
                now = loop.time()
                items = [QueuedWindow(request, i, w, now) for i, w in enumerate(windows)]
                if self._runs_at_once(items):
                    if self._runs_inline(items):
                        self._run_inline(items)
                    else:
                        self._run_now(loop, items)
                else:
                    pending = self._pending[priority]
                    for item in items:  # a window run at once needs no place, nor a prediction
                        item.order = now - self.cost.cost(1, item.length)
                        bisect.insort(pending, item, key=_queue_order)
                    self._account(priority, sum(i.length for i in items))
                    self._wakeup.set()
                await request.future
        except TimeoutError:
            self._abandon(request)
            self._metrics.rejections.labels("deadline").inc()
            raise DeadlineExceededError("the request's deadline passed while it waited") from None
        except asyncio.CancelledError:
            # The caller has gone: its windows leave the queue and never reach the engine.
            self._abandon(request)
            self._metrics.rejections.labels("cancelled").inc()
            raise
        return SubmitResult(request.logits, request.queue_s, request.inference_s, request.batches)

    async def close(self, timeout: float | None = None) -> None:
        """Refuse new work, run what is queued, then stop; after `timeout` fail the rest."""
        if self._closing:
            return
        self._closing = True
        self._wakeup.set()
        self._room.set()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*self._tasks, *self._stopped, *self._direct)
        except TimeoutError:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            # Batches not yet taken are dropped; a thread in a run ends after it.
            while not self._ready.empty():
                self._ready.get_nowait()
            for _ in self._threads:
                self._ready.put(None)
        for request in list(self._live):
            self._fail(request, BatcherClosedError("the service shut down before it ran"))

    # -- admission ---------------------------------------------------------------------------

    async def _admit(
        self, request: PendingRequest, windows: Sequence[IntArray], wait: bool
    ) -> None:
        n, tokens = len(windows), sum(int(w.size) for w in windows)
        cfg = self.config
        if request.priority is Priority.INTERACTIVE:
            items, queued_tokens = self.queued(Priority.INTERACTIVE)
            # An empty queue admits anything, so a request larger than the bounds still runs.
            if items and (
                items + n > cfg.max_queue_items or queued_tokens + tokens > cfg.max_queue_tokens
            ):
                self._metrics.rejections.labels("queue_full").inc()
                raise QueueFullError("the queue is full", self._retry_after())
            return
        while self._job_items and self._job_items + n > cfg.max_job_items:
            if not wait:
                self._metrics.rejections.labels("queue_full").inc()
                raise QueueFullError("too many batch-job windows in flight", self._retry_after())
            self._room.clear()
            await self._room.wait()
            if self._closing:
                raise BatcherClosedError("the service is shutting down")
        self._job_items += n

    def _retry_after(self) -> int:
        items = sum(len(p) for p in self._pending.values())
        tokens = sum(self._tokens.values())
        batches = max(items / self.config.max_batch_size, tokens / self.config.max_batch_tokens)
        return max(1, min(60, math.ceil((batches + 1) * self._run_seconds)))

    def _account(self, priority: Priority, tokens: int) -> None:
        self._tokens[priority] += tokens
        self._metrics.queue_items.labels(priority.label).set(len(self._pending[priority]))
        self._metrics.queue_tokens.labels(priority.label).set(self._tokens[priority])

    def _abandon(self, request: PendingRequest) -> None:
        if not request.future.done():
            request.future.cancel()
        pending = self._pending[request.priority]
        gone = [item for item in pending if item.request is request]
        if gone:
            self._pending[request.priority] = [i for i in pending if i.request is not request]
            self._account(request.priority, -sum(i.length for i in gone))
            self._release_jobs(request.priority, len(gone))

    def _release_jobs(self, priority: Priority, n: int) -> None:
        if priority is Priority.BATCH and n:
            self._job_items -= n
            self._room.set()

    # -- forming -----------------------------------------------------------------------------

    async def _form_loop(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch is None:
                for _ in self._threads:
                    self._ready.put(None)  # one end marker per engine thread
                return
            self._hand(batch)  # an engine thread has work from now on

    async def _next_batch(self) -> list[QueuedWindow] | None:
        """Wait until a batch should leave, then take it from the queue (None: closed)."""
        loop = asyncio.get_running_loop()
        while True:
            self._wakeup.clear()
            oldest = self._oldest()
            if oldest is None:
                if self._closing:
                    return None
                await self._wakeup.wait()
                continue
            waited = loop.time() - oldest.enqueued
            # With batching on, at most one batch waits for an engine thread. A partial batch
            # leaves for an idle thread at once unless more windows are being tokenized (then
            # after max-wait), but not while every thread is busy: waiting can only fill it more.
            # One window per run: see `_slots`.
            slot_free = self._ready.qsize() < self._slots
            expired = waited >= self.config.max_wait_s or not self.incoming
            priority = oldest.request.priority
            leave = self._closing or self._can_fill(priority) or (expired and self._runner_idle)
            if priority is not Priority.INTERACTIVE:
                # Batch-job windows leave only for an idle engine, so the slot stays free for an
                # interactive batch and one arriving waits behind at most one short job batch.
                leave = leave and self._runner_idle
            if slot_free and leave:
                if not self.policy.batching:
                    return self._take([oldest])
                pending = self._pending[priority]
                return self._take(select_batch(oldest, pending, self.config, self.cost))
            timeout = None if expired or not slot_free else self.config.max_wait_s - waited
            try:
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
            except TimeoutError:
                pass

    @property
    def _slots(self) -> int:
        """Formed batches that may wait for an engine thread.

        One window per run: up to one window per engine thread is handed over ahead, so a thread
        that finishes a run starts the next at once instead of waiting for the event loop to
        hand it one (under load the loop is busy with HTTP work: on 2 cores that wait left 6-7%
        of the CPU idle). The rest wait in the queue, where a caller that goes, or a deadline,
        can still take them back."""
        return 1 if self.policy.batching else self._workers

    def _oldest(self) -> QueuedWindow | None:
        for priority in Priority:
            if self._pending[priority]:
                return self._pending[priority][0]
        return None

    def _can_fill(self, priority: Priority) -> bool:
        """Enough windows of one priority are waiting to fill a batch (priorities do not mix)."""
        items, tokens = len(self._pending[priority]), self._tokens[priority]
        if not self.policy.batching:
            # One window per run: any window may leave once the hand-off queue has room
            # (`_slots`, checked by the caller).
            return items > 0
        return items >= self.config.max_batch_size or tokens >= self.config.max_batch_tokens

    def _take(self, batch: list[QueuedWindow]) -> list[QueuedWindow]:
        now = asyncio.get_running_loop().time()
        taken = {id(item) for item in batch}
        for priority in Priority:
            mine = [i for i in batch if i.request.priority is priority]
            if not mine:
                continue
            self._pending[priority] = [i for i in self._pending[priority] if id(i) not in taken]
            self._account(priority, -sum(i.length for i in mine))
            wait = self._metrics.queue_wait.labels(priority.label)
            for item in mine:
                wait.observe(now - item.enqueued)
                item.request.queue_s = max(item.request.queue_s, now - item.enqueued)
        return batch

    def _fail(self, request: PendingRequest, error: BatcherError) -> None:
        if not request.future.done():
            request.future.set_exception(error)
        self._abandon(request)
