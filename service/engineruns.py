"""The running half of the dynamic batcher: engine threads that take formed batches straight from
the hand-off queue, and the results handed back to their requests on the event loop.
`DynamicBatcher` (service/batcher.py) owns the queue and the forming, and the state below.

An engine thread that finishes a run takes the next formed batch itself, without waiting for
the event loop: under load the loop is busy with HTTP work, and a core left idle until it gets
round to handing over the next batch is throughput lost.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

from service.artifact import FloatArray, IntArray, pad_batch
from service.costmodel import BatchingPolicy, CostModel
from service.engine import Engine
from service.metrics import Metrics
from service.queueing import (
    BatcherConfig,
    BatcherError,
    BatchFailedError,
    PendingRequest,
    Priority,
    QueuedWindow,
    deliver,
)
from service.threadnames import name_this_thread

log = logging.getLogger("service.batcher")

# What an engine thread takes: a formed batch and, for a run `submit` started itself, the future
# that says it has ended; None tells the thread to stop.
Handoff = tuple[list[QueuedWindow], "asyncio.Future[None] | None"] | None
# What a run gives back: its input ids and mask (None when nothing ran), logits or the error
# it raised, and its seconds.
Outcome = tuple[IntArray | None, IntArray | None, FloatArray | None, Exception | None, float]


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class EngineRuns:
    """Runs batches on the engine's threads; mixed into DynamicBatcher, which sets these."""

    _engine: Engine
    _metrics: Metrics
    _workers: int
    _idle: int  # engine threads free, less batches handed to them and not yet run
    _num_labels: int
    _pending: dict[Priority, list[QueuedWindow]]
    _ready: queue.SimpleQueue[Handoff]  # formed batches not yet taken by an engine thread
    _threads: list[threading.Thread]
    _stopped: list[asyncio.Future[None]]  # one per engine thread, set when it has ended
    _direct: set[asyncio.Future[None]]  # runs started by `submit` itself
    _closing: bool
    _run_seconds: float
    incoming: int
    config: BatcherConfig
    cost: CostModel
    policy: BatchingPolicy

    def _nudge(self) -> None:
        raise NotImplementedError

    def _release_jobs(self, priority: Priority, n: int) -> None:
        raise NotImplementedError

    def _fail(self, request: PendingRequest, error: BatcherError) -> None:
        raise NotImplementedError

    @property
    def _runner_idle(self) -> bool:
        return self._idle > 0

    def _start_threads(self, loop: asyncio.AbstractEventLoop) -> None:
        self._stopped = [loop.create_future() for _ in range(self._workers)]
        self._threads = [
            threading.Thread(
                target=self._engine_thread,
                args=(loop, stopped),
                name=f"linmod-engine-{i}",
                daemon=True,
            )
            for i, stopped in enumerate(self._stopped)
        ]
        for thread in self._threads:
            thread.start()

    def _hand(self, batch: list[QueuedWindow], direct: asyncio.Future[None] | None = None) -> None:
        """Give a formed batch to the engine threads (on the loop; `_idle` counts it taken)."""
        self._idle -= 1
        self._ready.put((batch, direct))

    def _engine_thread(
        self, loop: asyncio.AbstractEventLoop, stopped: asyncio.Future[None]
    ) -> None:
        name_this_thread()

        def post(callback: object, *args: object) -> bool:
            try:
                loop.call_soon_threadsafe(callback, *args)  # type: ignore[arg-type]
            except RuntimeError:  # the loop has closed: nobody is waiting
                return False
            return True

        try:
            while True:
                handed = self._ready.get()
                if handed is None:
                    return
                batch, direct = handed
                if any(self._pending.values()):
                    # A slot is free: the next batch may be formed. (Nothing queued: nothing to
                    # form, and waking the loop would only take a core from this run.)
                    post(self._nudge)
                # A window whose caller has gone is skipped (a stale read only runs it anyway).
                live = [item for item in batch if not item.request.done]
                ran: Outcome
                if live:
                    # Alone (no other run, nothing queued), a run may take every core.
                    solo = self._idle == self._workers - 1 and not any(self._pending.values())
                    ran = self._execute(live, solo)
                else:
                    ran = (None, None, None, None, 0.0)
                if not post(self._ran, batch, live, *ran, direct):
                    return
        finally:
            post(_set_done, stopped)

    def _execute(self, batch: list[QueuedWindow], solo: bool) -> Outcome:
        """One engine run of `batch` (blocking): its inputs, logits or error, and seconds."""
        ids, mask = pad_batch([item.ids for item in batch], self._engine.config.pad_id)
        logits: FloatArray | None = None
        error: Exception | None = None
        start = time.perf_counter()
        try:
            logits = self._engine.run(ids, mask, solo)
        except Exception as exc:
            error = exc
        return ids, mask, logits, error, time.perf_counter() - start

    def _ran(
        self,
        batch: list[QueuedWindow],
        live: list[QueuedWindow],
        ids: IntArray | None,
        mask: IntArray | None,
        logits: FloatArray | None,
        error: Exception | None,
        seconds: float,
        direct: asyncio.Future[None] | None,
    ) -> None:
        """On the loop, after an engine thread's run: results to their requests, the thread
        counted free again."""
        try:
            if ids is not None and mask is not None:
                if error is not None or logits is None:
                    self._failed(live, ids, error or RuntimeError("no logits"))
                else:
                    self._completed(live, ids, mask, logits, seconds)
        finally:
            self._idle += 1
            self._nudge()  # a partial batch held back for a busy engine may leave now
            for priority in Priority:
                self._release_jobs(priority, sum(i.request.priority is priority for i in batch))
            if direct is not None:
                self._direct.discard(direct)
                direct.set_result(None)

    # -- one window at once ------------------------------------------------------------------

    def _runs_at_once(self, items: list[QueuedWindow]) -> bool:
        """Batching off, one interactive window, nothing queued, a runner free and no batch
        waiting for one: the forming task would hand it straight to a runner, so it skips that
        task. (With batching on, requests arriving together still meet in the queue.)"""
        return (
            not self.policy.batching
            and len(items) == 1
            and items[0].request.priority is Priority.INTERACTIVE
            and not self._closing
            and self._runner_idle
            and self._ready.empty()
            and not any(self._pending.values())
        )

    def _runs_inline(self, items: list[QueuedWindow]) -> bool:
        """Run at once, no engine thread busy and nothing being tokenized, and short by the
        cost grid: cheaper on the loop's own thread than the two thread hops."""
        limit = self.config.inline_run_s
        return (
            limit > 0
            and self._idle == self._workers
            and self.incoming == 0
            and bool(self.cost.points)
            and self.cost.cost(1, items[0].length) <= limit
        )

    def _run_inline(self, batch: list[QueuedWindow]) -> None:
        """Run `batch` on the event loop's thread and deliver its results before returning.
        The loop waits for the run (ONNX Runtime releases the GIL, so other threads go on), which
        `_runs_inline` bounds by the predicted run time; on an idle server nothing else is
        waiting for it, and a lone request skips the hop to an engine thread and back."""
        self._metrics.queue_wait.labels(batch[0].request.priority.label).observe(0.0)
        self._idle -= 1
        self._ran(batch, batch, *self._execute(batch, solo=True), None)

    def _run_now(self, loop: asyncio.AbstractEventLoop, batch: list[QueuedWindow]) -> None:
        """Hand `batch` to a free engine thread from the caller's own task: no forming-task
        hop between the request and the engine thread. The thread stays taken until the engine
        returns, even when the caller has gone."""
        wait = self._metrics.queue_wait.labels(batch[0].request.priority.label)
        for _ in batch:
            wait.observe(0.0)
        done: asyncio.Future[None] = loop.create_future()
        self._direct.add(done)
        self._hand(batch, done)

    # -- results -----------------------------------------------------------------------------

    def _failed(self, batch: list[QueuedWindow], ids: IntArray, exc: Exception) -> None:
        log.exception(
            "inference failed", extra={"batch": ids.shape[0], "length": ids.shape[1]},
            exc_info=exc,
        )  # fmt: skip
        failed = {id(i.request): i.request for i in batch}.values()
        for request in failed:
            self._metrics.rejections.labels("engine_error").inc()
            self._fail(request, BatchFailedError(f"inference failed: {str(exc)[:300]}"))

    def _completed(
        self,
        batch: list[QueuedWindow],
        ids: IntArray,
        mask: IntArray,
        logits: FloatArray,
        seconds: float,
    ) -> None:
        if logits.shape != (len(batch), self._num_labels):
            self._failed(
                batch, ids, RuntimeError(f"engine returned logits of shape {logits.shape}")
            )
            return
        deliver(batch, logits, seconds)
        # The callers resume first (their tasks are queued now); the cost model and the run's
        # metrics follow in the same turn of the loop, after their answers are written.
        asyncio.get_running_loop().call_soon(self._account_run, batch, ids, mask, seconds)

    def _account_run(
        self, batch: list[QueuedWindow], ids: IntArray, mask: IntArray, seconds: float
    ) -> None:
        self._run_seconds = 0.8 * self._run_seconds + 0.2 * seconds
        self.cost.observe(len(batch), int(ids.shape[1]), seconds)
        self._metrics.observe_batch(len(batch), int(mask.sum()), int(mask.size), seconds)
