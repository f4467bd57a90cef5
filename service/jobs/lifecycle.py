"""Batches through OpenAI's status machine: validating them into lines, then finalizing,
cancelling, expiring and, after the retention time, deleting them, each exactly once.

Each step is a conditional UPDATE of the batch's row (its status, or a lease on the step), so
two replicas never both take it; a step whose worker died is taken over once its lease lapses.
While a batch runs, its row is not written: its counts come from its lines, and are stored in
the row when it ends. Every call is blocking (run it through `Database.run`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, delete, func, insert, or_, select, update

from service.jobs.claims import fail_lines, result_size
from service.jobs.db import Database, batch_lines, batches, file_lines, files, new_id
from service.jobs.jsonl import LineValidator, error_line
from service.jobs.records import (
    ACTIVE,
    CANCELLED,
    CANCELLING,
    CLAIMED,
    COMPLETED,
    DONE,
    EXPIRED,
    FAILED,
    FINALIZING,
    IN_PROGRESS,
    PENDING,
    PROCESSED,
    SUCCEEDED,
    UPLOADING,
    VALIDATING,
)

PAGE = 1000  # lines read per statement
STALE_UPLOAD_S = 24 * 3600.0  # an upload unfinished this long was cut off with its replica


@dataclass(frozen=True)
class ActiveBatch:
    """What a worker needs to know of a batch that is not finished."""

    id: str
    status: str
    endpoint: str
    expires_at: float
    lease_expires: float | None
    unfinished: bool  # some line is not done yet


class BatchLifecycle:
    """The steps of a batch that one worker takes at a time."""

    def __init__(
        self, db: Database, *, retention_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.db = db
        self.retention_s = retention_s
        self.clock = clock

    def active_batches(self) -> list[ActiveBatch]:
        """Batches not yet finished, oldest first."""
        c, b = batches.c, batch_lines.c
        # One index probe per batch, however many lines it has: this runs on every wake-up.
        unfinished = select(b.line_no).where(b.batch_id == c.id, b.state != DONE).exists()
        query = select(
            c.id, c.status, c.endpoint, c.expires_at, c.lease_expires, unfinished.label("u")
        )
        with self.db.read() as conn:
            rows = conn.execute(query.where(c.status.in_(ACTIVE)).order_by(c.seq)).all()
        return [
            ActiveBatch(
                row.id, row.status, row.endpoint, row.expires_at, row.lease_expires, bool(row.u)
            )
            for row in rows
        ]

    def claim_batch(self, batch_id: str, status: str, worker: str, lease_s: float) -> bool:
        """Take the batch's validation or finalization, unless another worker's lease holds."""
        now = self.clock()
        c = batches.c
        with self.db.write() as conn:
            taken = conn.execute(
                update(batches)
                .where(
                    c.id == batch_id,
                    c.status == status,
                    or_(c.lease_expires.is_(None), c.lease_expires < now),
                )
                .values(worker=worker, lease_expires=now + lease_s)
            ).rowcount
        return bool(taken)

    # -- validating --------------------------------------------------------------------------

    def validate(self, batch_id: str, worker: str) -> int | None:
        """Parse a claimed batch's input file into lines, in one transaction: in_progress, or
        failed when the file has gone. Returns the lines refused (they are done, in the error
        file), or None if the batch was cancelled or taken over meanwhile."""
        now = self.clock()
        c = batches.c
        with self.db.write() as conn:
            # First, so a concurrent cancel or second validator waits on this row (PostgreSQL).
            moved = conn.execute(
                update(batches)
                .where(c.id == batch_id, c.status == VALIDATING, c.worker == worker)
                .values(status=IN_PROGRESS, in_progress_at=now, worker=None, lease_expires=None)
            ).rowcount
            if not moved:
                return None
            batch = conn.execute(select(c.input_file_id, c.endpoint).where(c.id == batch_id)).one()
            present = conn.execute(
                select(files.c.id).where(
                    files.c.id == batch.input_file_id, files.c.status == PROCESSED
                )
            ).first()
            if present is None:
                error = {
                    "code": "input_file_not_found", "line": None, "param": "input_file_id",
                    "message": f"the input file {batch.input_file_id!r} was deleted before the "
                    "batch started",
                }  # fmt: skip
                conn.execute(
                    update(batches)
                    .where(c.id == batch_id)
                    .values(
                        status=FAILED, failed_at=now, ended_at=now, in_progress_at=None, total=0,
                        errors=json.dumps([error]),
                    )
                )  # fmt: skip
                return 0
            total, failed = self._insert_lines(conn, batch_id, batch.input_file_id, batch.endpoint)
            conn.execute(update(batches).where(c.id == batch_id).values(total=total))
        return failed

    def fail_validation(self, batch_id: str, worker: str) -> bool:
        """validating -> failed, for a batch whose validation raised (its lines were rolled
        back); the batch's errors say so. False if another worker holds it meanwhile."""
        now = self.clock()
        c = batches.c
        error = {
            "code": "validation_failed", "line": None, "param": "input_file_id",
            "message": "the input file could not be read into requests; upload it again, or "
            "report the batch id to the server's operator",
        }  # fmt: skip
        with self.db.write() as conn:
            failed = conn.execute(
                update(batches)
                .where(c.id == batch_id, c.status == VALIDATING, c.worker == worker)
                .values(
                    status=FAILED, failed_at=now, ended_at=now, total=0, worker=None,
                    lease_expires=None, errors=json.dumps([error]),
                )
            ).rowcount  # fmt: skip
        return bool(failed)

    def _insert_lines(
        self, conn: Connection, batch_id: str, file_id: str, endpoint: str
    ) -> tuple[int, int]:
        parse = LineValidator(endpoint)
        total = failed = after = 0
        while True:
            rows = conn.execute(
                select(file_lines.c.line_no, file_lines.c.text)
                .where(file_lines.c.file_id == file_id, file_lines.c.line_no > after)
                .order_by(file_lines.c.line_no)
                .limit(PAGE)
            ).all()
            if not rows:
                return total, failed
            after = rows[-1].line_no
            values = []
            for line_no, text in rows:
                parsed = parse(line_no, text)
                if parsed is None:
                    continue
                total += 1
                row: dict[str, Any] = {
                    "batch_id": batch_id, "line_no": line_no, "custom_id": parsed.custom_id,
                    "body": parsed.body, "state": PENDING, "attempts": 0, "outcome": None,
                    "result": None, "result_bytes": None,
                }  # fmt: skip
                if parsed.error_code is not None:
                    failed += 1
                    line = error_line(
                        parsed.custom_id, parsed.error_code, parsed.error_message or ""
                    )
                    row |= {"state": DONE, "outcome": FAILED, "result": line,
                            "result_bytes": result_size(line)}  # fmt: skip
                values.append(row)
            if values:
                conn.execute(insert(batch_lines), values)

    # -- finishing ---------------------------------------------------------------------------

    def finalize(self, batch_id: str, worker: str, lease_s: float) -> bool:
        """in_progress -> finalizing -> completed once every line is done; False if not yet,
        or another worker got there first."""
        return self.begin_finalizing(batch_id, worker, lease_s) and self.complete(batch_id, worker)

    def begin_finalizing(self, batch_id: str, worker: str, lease_s: float) -> bool:
        """in_progress -> finalizing, under this worker's lease, once every line is done."""
        now = self.clock()
        c, b = batches.c, batch_lines.c
        unfinished = select(b.line_no).where(b.batch_id == batch_id, b.state != DONE).exists()
        with self.db.write() as conn:
            begun = conn.execute(
                update(batches)
                .where(c.id == batch_id, c.status == IN_PROGRESS, ~unfinished)
                .values(
                    status=FINALIZING, finalizing_at=now, worker=worker, lease_expires=now + lease_s
                )
            ).rowcount
        return bool(begun)

    def complete(self, batch_id: str, worker: str) -> bool:
        """finalizing -> completed, writing the output and error files (the finalizer's part;
        another worker calls it after taking over a lapsed finalization)."""
        now = self.clock()
        c = batches.c
        with self.db.write() as conn:
            done = conn.execute(
                update(batches)
                .where(c.id == batch_id, c.status == FINALIZING, c.worker == worker)
                .values(
                    status=COMPLETED, completed_at=now, ended_at=now, worker=None,
                    lease_expires=None,
                )
            ).rowcount  # fmt: skip
            if done:
                self._write_files(conn, batch_id, now)
        return bool(done)

    def finish_cancelled(self, batch_id: str) -> int | None:
        """cancelling -> cancelled once no worker holds a live lease on its lines; lines never
        run go to the error file as batch_cancelled. Returns how many, or None if not yet."""
        now = self.clock()
        b = batch_lines.c
        with self.db.read() as conn:
            live = conn.execute(
                select(func.count())
                .select_from(batch_lines)
                .where(b.batch_id == batch_id, b.state == CLAIMED, b.lease_expires >= now)
            ).scalar()
        if live:
            return None
        message = "the batch was cancelled before this request ran"
        return self._close(batch_id, (CANCELLING,), CANCELLED, "batch_cancelled", message)

    def expire(self, batch_id: str) -> int | None:
        """A batch past its completion window: expired, unfinished lines as batch_expired.
        Returns how many, or None if it was not due or already ended."""
        message = "the batch's completion window ended before this request ran"
        return self._close(batch_id, (VALIDATING, IN_PROGRESS), EXPIRED, "batch_expired", message)

    def _close(
        self, batch_id: str, from_statuses: Sequence[str], status: str, code: str, message: str
    ) -> int | None:
        now = self.clock()
        c, b = batches.c, batch_lines.c
        stamp = {CANCELLED: "cancelled_at", EXPIRED: "expired_at"}[status]
        due = c.expires_at < now if status == EXPIRED else c.id == batch_id
        with self.db.write() as conn:
            closed = conn.execute(
                update(batches)
                .where(c.id == batch_id, c.status.in_(from_statuses), due)
                .values(status=status, ended_at=now, worker=None, lease_expires=None)
                .values({stamp: now})
            ).rowcount
            if not closed:
                return None
            # Locked, so a result written meanwhile cannot be overwritten or counted twice.
            open_lines = conn.execute(
                select(b.line_no, b.custom_id)
                .where(b.batch_id == batch_id, b.state != DONE)
                .order_by(b.line_no)
                .with_for_update()
            ).all()
            if open_lines:
                fail_lines(conn, batch_id, open_lines, code, message)
            ran = conn.execute(
                select(func.count()).select_from(batch_lines).where(b.batch_id == batch_id)
            ).scalar()
            if not ran:  # never validated: nothing was read, nothing to count
                conn.execute(update(batches).where(c.id == batch_id).values(total=0))
            self._write_files(conn, batch_id, now)
        return len(open_lines)

    def _write_files(self, conn: Connection, batch_id: str, now: float) -> None:
        """The output and error files of a batch that has ended, and its final counts."""
        batch = conn.execute(
            select(batches.c.owner, batches.c.output_ttl_s).where(batches.c.id == batch_id)
        ).one()
        b = batch_lines.c
        sums = {
            outcome: (int(n), int(size or 0))
            for outcome, n, size in conn.execute(
                select(b.outcome, func.count(), func.sum(b.result_bytes))
                .where(b.batch_id == batch_id, b.state == DONE)
                .group_by(b.outcome)
            ).all()
        }
        ttl = batch.output_ttl_s or self.retention_s
        ids: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
        for outcome, kind in ((SUCCEEDED, "output"), (FAILED, "error")):
            n, size = sums.get(outcome, (0, 0))
            if not n:
                continue
            file_id = new_id("file-")
            ids[f"{kind}_file_id"] = file_id
            conn.execute(
                insert(files).values(
                    id=file_id, owner=batch.owner, purpose="batch_output", kind=kind,
                    filename=f"{batch_id}_{kind}.jsonl", bytes=size, lines=n, status=PROCESSED,
                    batch_id=batch_id, created_at=now, expires_at=now + ttl,
                )
            )  # fmt: skip
        conn.execute(
            update(batches)
            .where(batches.c.id == batch_id)
            .values(
                **ids, completed=sums.get(SUCCEEDED, (0, 0))[0], failed=sums.get(FAILED, (0, 0))[0]
            )
        )

    # -- retention ---------------------------------------------------------------------------

    def cleanup(self) -> dict[str, int]:
        """Delete expired files, uploads cut off long ago, and batches that ended more than the
        retention time ago (their lines and files with them)."""
        now = self.clock()
        deleted = {"files": 0, "batches": 0}
        f, c = files.c, batches.c
        stale_files = or_(
            and_(f.status == PROCESSED, f.expires_at < now),
            and_(f.status == UPLOADING, f.created_at < now - STALE_UPLOAD_S),
        )
        while ids := self._ids(select(f.id).where(stale_files)):
            with self.db.write() as conn:
                conn.execute(delete(file_lines).where(file_lines.c.file_id.in_(ids)))
                deleted["files"] += conn.execute(delete(files).where(f.id.in_(ids))).rowcount
        old = c.ended_at < now - self.retention_s
        while ids := self._ids(select(c.id).where(old)):
            with self.db.write() as conn:
                conn.execute(delete(batch_lines).where(batch_lines.c.batch_id.in_(ids)))
                deleted["files"] += conn.execute(delete(files).where(f.batch_id.in_(ids))).rowcount
                deleted["batches"] += conn.execute(delete(batches).where(c.id.in_(ids))).rowcount
        return deleted

    def _ids(self, query: Any) -> list[str]:
        # A few at a time: an input file may hold 50,000 lines, and so may a batch.
        with self.db.read() as conn:
            return [row[0] for row in conn.execute(query.limit(10)).all()]
