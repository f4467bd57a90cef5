"""The batch-jobs worker, a background service of the app: validates new batches, claims their
lines under a lease, runs each through the classifier at batch priority, writes each result, and
finishes, cancels, expires and deletes batches. Replicas sharing a database share the work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable

from service.batcher import BatcherClosedError
from service.errors import error_body
from service.jobs.claims import ClaimedLine, LineClaims, LineResult
from service.jobs.db import Database
from service.jobs.dispatch import dispatch
from service.jobs.jsonl import response_line
from service.jobs.lifecycle import ActiveBatch, BatchLifecycle
from service.jobs.records import CANCELLING, FINALIZING, IN_PROGRESS, VALIDATING
from service.jobs.store import JobStore
from service.settings import Settings
from service.state import ServiceState

log = logging.getLogger(__name__)

LineKey = tuple[str, int]


class JobWorker:
    """The work of this replica on the app's job store (which the lifespan opens and closes).

    It holds at most twice `job_claim_lines` lines, and the batcher bounds batch-job windows
    apart (`max_job_items`), so interactive requests keep their latency while a big job runs.
    """

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        # Readable in logs and in the database: which replica did what.
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.db: Database | None = None
        self.store: JobStore | None = None
        self.claims: LineClaims | None = None
        self.lifecycle: BatchLifecycle | None = None
        self._state: ServiceState | None = None
        self._wake = asyncio.Event()
        self._flush = asyncio.Event()
        self._inflight: dict[LineKey, asyncio.Task[None]] = {}
        self._results: list[LineResult] = []
        self._writing = 0  # results taken by the writer and not yet stored
        self._lapsed_check_at = 0.0  # monotonic time of the next claim pass for lapsed lines only
        self._release: list[LineKey] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, state: ServiceState) -> None:
        """Start working on the store the lifespan opened (`state.store`)."""
        s = self.settings
        if state.store is None:
            raise RuntimeError("the job store is not open")
        self.store, self._state = state.store, state
        db = self.db = state.store.db
        self.claims = LineClaims(db, clock=self.clock)
        self.lifecycle = BatchLifecycle(db, retention_s=s.job_retention_s, clock=self.clock)
        self._tasks = [
            asyncio.create_task(self._loop(), name="linmod-jobs"),
            asyncio.create_task(self._heartbeat(), name="linmod-jobs-heartbeat"),
            asyncio.create_task(self._writer(), name="linmod-jobs-writer"),
        ]
        log.info("batch-job worker started", extra={"worker": self.id, "database": db.url})

    async def stop(self) -> None:
        """Stop claiming, let lines in flight finish (the batcher still runs), write their
        results, and hand back what did not finish in time."""
        if self.db is None or self._closing:
            return
        self._stopping = True
        self._wake.set()
        loop_task, heartbeat, writer = self._tasks
        await asyncio.gather(loop_task, return_exceptions=True)
        if self._inflight:
            await asyncio.wait(
                list(self._inflight.values()), timeout=self.settings.shutdown_timeout_s
            )
        for task in list(self._inflight.values()):
            task.cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        self._closing = True
        self._flush.set()
        await asyncio.gather(writer, return_exceptions=True)
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
        log.info("batch-job worker stopped", extra={"worker": self.id})

    async def drain(self) -> None:
        """Stop claiming and hand back every line in flight at once (the server is draining),
        so other replicas take them now; results already computed are written first."""
        if self.db is None or self._stopping:
            return
        self._stopping = True
        self._wake.set()
        await asyncio.gather(self._tasks[0], return_exceptions=True)
        for task in list(self._inflight.values()):
            task.cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        try:
            await self._write()
        except Exception:
            log.exception("handing back batch lines failed", extra={"worker": self.id})
        log.info("batch-job lines handed back", extra={"worker": self.id})

    def wake(self) -> None:
        """Look for work now (a batch was created or cancelled here)."""
        self._wake.set()

    # -- the loop ----------------------------------------------------------------------------

    async def _loop(self) -> None:
        next_cleanup = next_gauges = 0.0
        while not self._stopping:
            self._wake.clear()
            busy = False
            try:
                now = time.monotonic()
                if now >= next_gauges:
                    next_gauges = now + self.settings.job_poll_s
                    await self._update_gauges()
                if now >= next_cleanup:
                    next_cleanup = now + self.settings.job_cleanup_interval_s
                    await self._cleanup()
                busy = await self._step()
            except Exception:
                log.exception("batch-job step failed", extra={"worker": self.id})
            if not busy:
                try:
                    async with asyncio.timeout(self.settings.job_poll_s):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    async def _step(self) -> bool:
        """One pass over the unfinished batches; whether it did anything."""
        assert self.db is not None and self.lifecycle is not None
        db, life = self.db, self.lifecycle
        active = await db.run(life.active_batches)
        now = self.clock()
        busy = False
        running: dict[str, str] = {}  # in-progress batch id -> endpoint, lines left to claim
        for batch in active:
            try:
                busy = await self._advance(batch, now, running) or busy
            except Exception:
                # One batch's failure never ends the pass: the others go on.
                log.exception("batch step failed", extra={"batch": batch.id, "worker": self.id})
        # Lines of batches cancelled or expired meanwhile stop here and go back.
        for (batch_id, _), task in list(self._inflight.items()):
            if batch_id not in running:
                task.cancel()
        return await self._claim(running) or busy

    async def _advance(self, batch: ActiveBatch, now: float, running: dict[str, str]) -> bool:
        """The next step of one batch; whether it did anything. Adds running batches."""
        assert self.db is not None and self.lifecycle is not None
        db, life, s = self.db, self.lifecycle, self.settings
        if batch.status in (VALIDATING, IN_PROGRESS) and batch.expires_at < now:
            unrun = await db.run(life.expire, batch.id)
            if unrun is not None:
                self._count_failed(unrun)
                log.info("batch expired", extra={"batch": batch.id, "unrun": unrun})
                return True
        elif batch.status == VALIDATING and self._lease_free(batch, now):
            if await db.run(life.claim_batch, batch.id, VALIDATING, self.id, s.job_lease_s):
                try:
                    refused = await db.run(life.validate, batch.id, self.id)
                except Exception:
                    # Retrying would fail the same way, every lease, for a day: fail it now.
                    log.exception("batch validation failed", extra={"batch": batch.id})
                    await db.run(life.fail_validation, batch.id, self.id)
                    return True
                self._count_failed(refused or 0)
                where = {"batch": batch.id, "worker": self.id, "refused": refused}
                log.info("batch validated", extra=where)
                return True
        elif batch.status == IN_PROGRESS:
            if not batch.unfinished:
                if await db.run(life.finalize, batch.id, self.id, s.job_lease_s):
                    log.info("batch completed", extra={"batch": batch.id, "worker": self.id})
                    return True
            else:
                running[batch.id] = batch.endpoint
        elif batch.status == FINALIZING and self._lease_free(batch, now):
            # Its finalizer stopped between the two steps; finish its work.
            if await db.run(life.claim_batch, batch.id, FINALIZING, self.id, s.job_lease_s):
                return await db.run(life.complete, batch.id, self.id)
        elif batch.status == CANCELLING:
            unrun = await db.run(life.finish_cancelled, batch.id)
            if unrun is not None:
                self._count_failed(unrun)
                log.info("batch cancelled", extra={"batch": batch.id, "unrun": unrun})
                return True
        return False

    def _count_failed(self, n: int) -> None:
        assert self._state is not None
        self._state.metrics.batch_job_lines.labels("failed").inc(n)

    @staticmethod
    def _lease_free(batch: ActiveBatch, now: float) -> bool:
        return batch.lease_expires is None or batch.lease_expires < now

    async def _claim(self, running: dict[str, str]) -> bool:
        assert self.db is not None and self.claims is not None and self._state is not None
        s = self.settings
        # Lines run but not yet written still hold their leases: claiming more while results
        # pile up lets leases lapse and a drain overrun, so they count against the room too.
        room = 2 * s.job_claim_lines - len(self._inflight) - len(self._results) - self._writing
        if not running or not self._state.ready or self._stopping:
            return False
        lapsed_only = room < s.job_claim_lines
        if lapsed_only:
            # Full, but a dead replica's lines (their leases lapsed) are taken at once rather
            # than when this one has room: checked at most once per poll interval.
            now = time.monotonic()
            if now < self._lapsed_check_at:
                return False
            self._lapsed_check_at = now + s.job_poll_s
        lines, spent = await self.db.run(
            self.claims.claim_lines, self.id, list(running), s.job_claim_lines, s.job_lease_s,
            lapsed_only,
        )  # fmt: skip
        self._count_failed(spent)
        for line in lines:
            key = (line.batch_id, line.line_no)
            self._inflight[key] = asyncio.create_task(
                self._run_line(line, running[line.batch_id]), name=f"linmod-job-line-{key}"
            )
        return bool(lines)

    async def _run_line(self, line: ClaimedLine, endpoint: str) -> None:
        assert self._state is not None
        key = (line.batch_id, line.line_no)
        rid = uuid.uuid4().hex
        try:
            try:
                status, body = await dispatch(self._state, endpoint, line.body, rid)
            except (asyncio.CancelledError, BatcherClosedError):
                self._release.append(key)
                self._flush.set()
                return
            except Exception:
                where = {"batch": line.batch_id, "line": line.line_no}
                log.exception("batch line failed", extra=where)
                status = 500
                body = error_body("internal server error", "server_error", "internal_error")
            output = response_line(line.custom_id, status, f"req_{rid}", body)
            self._results.append(LineResult(line.batch_id, line.line_no, status == 200, output))
            self._flush.set()
        finally:
            self._inflight.pop(key, None)

    # -- writing -----------------------------------------------------------------------------

    async def _writer(self) -> None:
        """Writes finished lines as they come; lines finishing together share a transaction."""
        while True:
            await self._flush.wait()
            self._flush.clear()
            try:
                await self._write()
            except Exception:
                log.exception("writing batch results failed", extra={"worker": self.id})
                if self._closing:
                    return  # the leases lapse and another worker redoes these lines
                await asyncio.sleep(self.settings.job_poll_s)
                self._flush.set()
                continue
            if self._closing and not (self._results or self._release):
                return

    async def _write(self) -> None:
        assert self.db is not None and self.claims is not None and self._state is not None
        results, self._results = self._results, []
        release, self._release = self._release, []
        self._writing = len(results)
        try:
            if results:
                written = await self.db.run(self.claims.write_results, self.id, results)
                lines = self._state.metrics.batch_job_lines
                succeeded = sum(r.succeeded for r in written)
                lines.labels("succeeded").inc(succeeded)
                lines.labels("failed").inc(len(written) - succeeded)
                if len(written) < len(results):
                    log.warning(
                        "results dropped: their lines were taken over after a lapsed lease",
                        extra={"worker": self.id, "dropped": len(results) - len(written)},
                    )
                results = []
            if release:
                await self.db.run(self.claims.release, self.id, release)
        except BaseException:
            self._results[:0], self._release[:0] = results, release
            raise
        finally:
            self._writing = 0
        self._wake.set()  # a batch may have finished

    async def _heartbeat(self) -> None:
        assert self.db is not None and self.claims is not None
        while True:
            await asyncio.sleep(self.settings.job_lease_s / 3)
            try:
                await self.db.run(self.claims.renew, self.id, self.settings.job_lease_s)
            except Exception:
                log.exception("renewing batch-job leases failed", extra={"worker": self.id})

    # -- housekeeping ------------------------------------------------------------------------

    async def _update_gauges(self) -> None:
        assert self.db is not None and self.store is not None and self._state is not None
        counts = await self.db.run(self.store.count_batches)
        for status, n in counts.items():
            self._state.metrics.batch_jobs.labels(status).set(n)

    async def _cleanup(self) -> None:
        assert self.db is not None and self.lifecycle is not None
        deleted = await self.db.run(self.lifecycle.cleanup)
        if any(deleted.values()):
            log.info("expired batch-job data deleted", extra=deleted)
