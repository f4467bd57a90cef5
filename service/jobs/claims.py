"""Lines of running batches, claimed by workers under a lease and written back with their results.

Claims take `SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL, so replicas take disjoint chunks;
on SQLite a writer holds the database lock from BEGIN. Every write is a conditional UPDATE: when
a lease has lapsed and another worker has taken the line over, the late result is dropped, never
doubled. Only lines are written here, locked in line order or skipped when locked, so replicas
never deadlock. Every call is blocking (run it through `Database.run`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, bindparam, or_, select, update

from service.jobs.db import Database, batch_lines, batches
from service.jobs.jsonl import error_line
from service.jobs.records import (
    CLAIMED,
    DONE,
    FAILED,
    FINALIZING,
    IN_PROGRESS,
    PENDING,
    SUCCEEDED,
    VALIDATING,
)

MAX_ATTEMPTS = 3  # claims of a line whose worker died each time; then it fails


@dataclass(frozen=True)
class ClaimedLine:
    """A request this worker holds until it writes its result or the lease lapses."""

    batch_id: str
    line_no: int
    custom_id: str | None
    body: str


@dataclass(frozen=True)
class LineResult:
    """The output or error line of one request."""

    batch_id: str
    line_no: int
    succeeded: bool
    line: str


class LineClaims:
    """What workers do with lines: claim, renew, hand back, write results."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    def claim_lines(
        self,
        worker: str,
        batch_ids: Sequence[str],
        n: int,
        lease_s: float,
        lapsed_only: bool = False,
    ) -> tuple[list[ClaimedLine], int]:
        """Up to n pending (or lapsed) lines of in-progress batches, oldest batch first; and how
        many lapsed lines failed instead, their workers having died on them MAX_ATTEMPTS times.
        `lapsed_only`: only other workers' lines whose lease has lapsed (a dead replica's); this
        worker's own lapsed lines are still in its hands (running, or waiting to be written)."""
        now = self.clock()
        b = batch_lines.c
        lapsed = and_(b.state == CLAIMED, b.lease_expires < now)
        if lapsed_only:
            claimable = and_(lapsed, b.worker != worker)
        else:
            claimable = or_(b.state == PENDING, lapsed)
        claimed: list[ClaimedLine] = []
        failed = 0
        with self.db.write() as conn:
            for batch_id in batch_ids:
                if len(claimed) >= n:
                    break
                status = conn.execute(
                    select(batches.c.status).where(batches.c.id == batch_id)
                ).scalar()
                if status != IN_PROGRESS:
                    continue
                rows = conn.execute(
                    select(b.line_no, b.custom_id, b.body, b.attempts)
                    .where(b.batch_id == batch_id, claimable)
                    .order_by(b.line_no)
                    .limit(n - len(claimed))
                    .with_for_update(skip_locked=True)
                ).all()
                spent = [r for r in rows if r.attempts >= MAX_ATTEMPTS]
                fresh = [r for r in rows if r.attempts < MAX_ATTEMPTS]
                if fresh:
                    conn.execute(
                        update(batch_lines)
                        .where(b.batch_id == batch_id, b.line_no.in_([r.line_no for r in fresh]))
                        .values(
                            state=CLAIMED, worker=worker, lease_expires=now + lease_s,
                            attempts=b.attempts + 1,
                        )
                    )  # fmt: skip
                    claimed += [
                        ClaimedLine(batch_id, r.line_no, r.custom_id, r.body) for r in fresh
                    ]
                if spent:
                    message = f"the worker running this request stopped {MAX_ATTEMPTS} times"
                    fail_lines(conn, batch_id, spent, "too_many_attempts", message)
                    failed += len(spent)
        return claimed, failed

    def renew(self, worker: str, lease_s: float) -> None:
        """Extend every lease this worker holds (a heartbeat). Rows locked right now are being
        written or closed, so they are skipped rather than waited for."""
        until = self.clock() + lease_s
        b, c = batch_lines.c, batches.c
        with self.db.write() as conn:
            held = conn.execute(
                select(b.batch_id, b.line_no)
                .where(b.worker == worker, b.state == CLAIMED)
                .with_for_update(skip_locked=True)
            ).all()
            for batch_id in {row.batch_id for row in held}:
                numbers = [row.line_no for row in held if row.batch_id == batch_id]
                conn.execute(
                    update(batch_lines)
                    .where(b.batch_id == batch_id, b.line_no.in_(numbers), b.worker == worker)
                    .values(lease_expires=until)
                )
            owned = (
                conn.execute(
                    select(c.id)
                    .where(c.worker == worker, c.status.in_((VALIDATING, FINALIZING)))
                    .with_for_update(skip_locked=True)
                )
                .scalars()
                .all()
            )
            if owned:
                conn.execute(
                    update(batches)
                    .where(c.id.in_(owned), c.worker == worker)
                    .values(lease_expires=until)
                )

    def release(self, worker: str, lines: Sequence[tuple[str, int]]) -> None:
        """Hand lines back unfinished (shutting down), so any worker may claim them at once."""
        if not lines:
            return
        b = batch_lines.c
        with self.db.write() as conn:
            conn.execute(
                update(batch_lines)
                .where(
                    b.batch_id == bindparam("b_id"), b.line_no == bindparam("b_no"),
                    b.state == CLAIMED, b.worker == worker,
                )
                .values(state=PENDING, worker=None, lease_expires=None, attempts=b.attempts - 1),
                [{"b_id": batch_id, "b_no": line_no} for batch_id, line_no in sorted(lines)],
            )  # fmt: skip

    def write_results(self, worker: str, results: Sequence[LineResult]) -> list[LineResult]:
        """Store results of lines this worker still holds, in line order; returns those written
        (a line taken over by another worker, or closed with its batch, is skipped)."""
        b = batch_lines.c
        written: list[LineResult] = []
        with self.db.write() as conn:
            for result in sorted(results, key=lambda r: (r.batch_id, r.line_no)):
                done = conn.execute(
                    update(batch_lines)
                    .where(
                        b.batch_id == result.batch_id, b.line_no == result.line_no,
                        b.state == CLAIMED, b.worker == worker,
                    )
                    .values(
                        state=DONE, outcome=SUCCEEDED if result.succeeded else FAILED,
                        result=result.line, result_bytes=result_size(result.line), body=None,
                        lease_expires=None,
                    )
                ).rowcount  # fmt: skip
                if done:
                    written.append(result)
        return written


def fail_lines(
    conn: Connection, batch_id: str, rows: Sequence[Any], code: str, message: str
) -> None:
    """Mark lines done and failed, each with an error line (`rows` have line_no, custom_id)."""
    b = batch_lines.c
    values = []
    for row in rows:
        line = error_line(row.custom_id, code, message)
        values.append({"b_no": row.line_no, "b_line": line, "b_size": result_size(line)})
    conn.execute(
        update(batch_lines)
        .where(b.batch_id == batch_id, b.line_no == bindparam("b_no"))
        .values(
            state=DONE, outcome=FAILED, result=bindparam("b_line"),
            result_bytes=bindparam("b_size"), body=None, worker=None, lease_expires=None,
        ),
        values,
    )  # fmt: skip


def result_size(line: str) -> int:
    """Bytes of a result line in its file."""
    return len(line.encode()) + 1  # with its newline
