"""The running half of the dynamic batcher: runner tasks that take formed batches to the engine's
threads, the run a lone window starts at once, and the results handed back to their requests.
`DynamicBatcher` (service/batcher.py) owns the queue and the forming, and the state below.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

from service.artifact import FloatArray, IntArray, pad_batch
from service.costmodel import BatchingPolicy, CostModel
from service.engine import Engine
from service.metrics import Metrics
from service.queueing import (
    BatcherError,
    BatchFailedError,
    PendingRequest,
    Priority,
    QueuedWindow,
    deliver,
)

log = logging.getLogger("service.batcher")


class EngineRuns:
    """Runs batches on the engine's threads; mixed into DynamicBatcher, which sets these."""

    _engine: Engine
    _metrics: Metrics
    _executor: ThreadPoolExecutor
    _workers: int
    _idle: int  # runners free, less batches handed to them and not yet run
    _num_labels: int
    _pending: dict[Priority, list[QueuedWindow]]
    _ready: asyncio.Queue[list[QueuedWindow] | None]
    _direct: set[asyncio.Future[None]]  # runs started by `submit` itself
    _closing: bool
    _run_seconds: float
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

    async def _run_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._ready.get()
            self._nudge()  # the slot is free: the next batch may be formed
            if batch is None:
                return
            live = [item for item in batch if not item.request.done]
            try:
                if live:
                    await self._run(loop, live)
            finally:
                self._idle += 1
                self._nudge()  # a partial batch held back for a busy engine may leave now
                for priority in Priority:
                    self._release_jobs(priority, sum(i.request.priority is priority for i in batch))

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[QueuedWindow]) -> None:
        ids, mask = pad_batch([item.ids for item in batch], self._engine.config.pad_id)
        start = time.perf_counter()
        try:
            # Alone (no other run, nothing queued), a run may take every core.
            solo = self._idle == self._workers - 1 and not any(self._pending.values())
            logits = await loop.run_in_executor(self._executor, self._engine.run, ids, mask, solo)
        except Exception as exc:
            self._failed(batch, ids, exc)
            return
        self._completed(batch, ids, mask, logits, time.perf_counter() - start)

    # -- one window at once ------------------------------------------------------------------

    def _runs_at_once(self, items: list[QueuedWindow]) -> bool:
        """Batching off, one interactive window, nothing queued, a runner free and no batch
        waiting for one: the forming task would hand it straight to a runner, so it skips both
        tasks. (With batching on, requests arriving together still meet in the queue.)"""
        return (
            not self.policy.batching
            and len(items) == 1
            and items[0].request.priority is Priority.INTERACTIVE
            and not self._closing
            and self._runner_idle
            and self._ready.empty()
            and not any(self._pending.values())
        )

    def _run_now(self, loop: asyncio.AbstractEventLoop, batch: list[QueuedWindow]) -> None:
        """Start `batch` on a free runner from the caller's own task: no forming-task and
        runner-task hops between the request and the engine thread. The runner stays taken
        until the engine returns, even when the caller has gone."""
        self._idle -= 1
        wait = self._metrics.queue_wait.labels(batch[0].request.priority.label)
        for _ in batch:
            wait.observe(0.0)
        ids, mask = pad_batch([item.ids for item in batch], self._engine.config.pad_id)
        solo = self._idle == self._workers - 1
        done: asyncio.Future[None] = loop.create_future()
        self._direct.add(done)
        start = time.perf_counter()

        def finish(future: Future[FloatArray]) -> None:
            try:
                logits = future.result()
            except Exception as exc:
                self._failed(batch, ids, exc)
            else:
                self._completed(batch, ids, mask, logits, time.perf_counter() - start)
            finally:
                self._idle += 1
                self._nudge()
                self._direct.discard(done)
                done.set_result(None)

        def returned(future: Future[FloatArray]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
                loop.call_soon_threadsafe(finish, future)

        self._executor.submit(self._engine.run, ids, mask, solo).add_done_callback(returned)

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
        self._run_seconds = 0.8 * self._run_seconds + 0.2 * seconds
        self.cost.observe(len(batch), int(ids.shape[1]), seconds)
        self._metrics.observe_batch(len(batch), int(mask.sum()), int(mask.size), seconds)
        deliver(batch, logits, seconds)
