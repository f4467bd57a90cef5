"""The API's side of the job store: files and batches as their owners see, make and cancel them.

Every call is blocking (run it through `Database.run`) and filters by owner, so another key's
objects are simply not found.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import delete, func, insert, select, update

from service.jobs.db import Database, batch_lines, batches, file_lines, files, new_id
from service.jobs.records import (
    CANCELLED,
    CANCELLING,
    DONE,
    FAILED,
    FINALIZING,
    IN_PROGRESS,
    NO_QUOTA,
    PROCESSED,
    STATUSES,
    SUCCEEDED,
    UPLOADING,
    VALIDATING,
    BatchRecord,
    FileRecord,
    Quota,
    QuotaExceededError,
    StateConflictError,
    UnknownObjectError,
    WrongFileError,
    live,
    owned,
    quota_message,
    record,
)


async def open_store(database_url: str, *, clock: Callable[[], float] = time.time) -> JobStore:
    """Connect to the job database, create the tables that are missing, and return its store."""
    db = Database(database_url)
    try:
        await db.run(db.create_schema)
    except BaseException:
        await asyncio.to_thread(db.close)
        raise
    return JobStore(db, clock=clock)


class JobStore:
    """Files and batches, as the HTTP routes use them; `db` runs its blocking calls."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    # -- files -------------------------------------------------------------------------------

    def begin_file(
        self, owner: str | None, filename: str, quota: Quota = NO_QUOTA
    ) -> tuple[str, int]:
        """A file row for an upload in progress (invisible until `complete_file`), and the bytes
        the owner may still upload; QuotaExceededError when it holds its quota already."""
        file_id = new_id("file-")
        with self.db.write() as conn:
            count, used = self._usage(conn, owner)
            if count >= quota.files:
                raise QuotaExceededError(
                    f"this key holds {count} files, its limit; delete some "
                    "(DELETE /v1/files/{id}) or wait for them to expire",
                    "file_count_quota_exceeded",
                )
            if used >= quota.bytes:
                raise QuotaExceededError(quota_message(used, quota), "storage_quota_exceeded")
            conn.execute(
                insert(files).values(
                    id=file_id, owner=owner, purpose="batch", kind="input", filename=filename,
                    bytes=0, lines=0, status=UPLOADING, created_at=self.clock(),
                )
            )  # fmt: skip
        return file_id, quota.bytes - used

    def _usage(self, conn: Any, owner: str | None, besides: str | None = None) -> tuple[int, int]:
        """(files, bytes) of the owner's live uploads, those in progress included."""
        f = files.c
        query = select(func.count(), func.coalesce(func.sum(f.bytes), 0)).where(
            owned(f.owner, owner), f.kind == "input", f.status.in_((UPLOADING, PROCESSED)),
            live(self.clock()),
        )  # fmt: skip
        if besides is not None:
            query = query.where(f.id != besides)
        count, size = conn.execute(query).one()
        return int(count), int(size)

    def add_lines(self, file_id: str, lines: Sequence[tuple[int, str]]) -> None:
        """Store the next lines of an upload, in one transaction."""
        if lines:
            rows = [{"file_id": file_id, "line_no": n, "text": text} for n, text in lines]
            with self.db.write() as conn:
                conn.execute(insert(file_lines), rows)

    def complete_file(
        self, file_id: str, *, size: int, lines: int, ttl_s: float, quota: Quota = NO_QUOTA
    ) -> FileRecord:
        """Make an upload visible; it expires `ttl_s` after it began. QuotaExceededError when
        uploads that ran beside it have taken the owner's room meanwhile."""
        with self.db.write() as conn:
            owner = conn.execute(select(files.c.owner).where(files.c.id == file_id)).scalar()
            _, used = self._usage(conn, owner, besides=file_id)
            if used + size > quota.bytes:
                raise QuotaExceededError(quota_message(used, quota), "storage_quota_exceeded")
            conn.execute(
                update(files)
                .where(files.c.id == file_id)
                .values(
                    status=PROCESSED, bytes=size, lines=lines, expires_at=files.c.created_at + ttl_s
                )
            )
            row = conn.execute(select(files).where(files.c.id == file_id)).one()
        return record(FileRecord, row)

    def discard_file(self, file_id: str) -> None:
        """Remove an upload that failed, and any lines it stored."""
        with self.db.write() as conn:
            conn.execute(delete(file_lines).where(file_lines.c.file_id == file_id))
            conn.execute(delete(files).where(files.c.id == file_id))

    def get_file(self, file_id: str, owner: str | None) -> FileRecord:
        """A complete file of this owner."""
        with self.db.read() as conn:
            return self._visible_file(conn, file_id, owner)

    def read_content(
        self, file: FileRecord, after: int, max_lines: int, max_bytes: int = 1024 * 1024
    ) -> list[tuple[int, str]]:
        """The next lines of a file after line `after`, (line number, text with newline): at
        most max_lines, and no more than max_bytes (about; characters for input lines) unless
        one line alone is longer, so memory per read stays bounded whatever the file holds."""
        number: Any
        size: Any
        content: Any
        table: Any
        with self.db.read() as conn:
            if file.kind == "input":
                c = file_lines.c
                where = [c.file_id == file.id]
                number, size, content = c.line_no, func.length(c.text), c.text
                table = file_lines
            else:
                b = batch_lines.c
                outcome = SUCCEEDED if file.kind == "output" else FAILED
                where = [b.batch_id == file.batch_id, b.outcome == outcome]
                number, size, content = b.line_no, b.result_bytes, b.result
                table = batch_lines
            # First the sizes only, then the text of the lines that fit.
            sizes = conn.execute(
                select(number, size).where(*where, number > after).order_by(number).limit(max_lines)
            ).all()
            last, total = after, 0
            for n, length in sizes:
                if total and total + int(length or 0) > max_bytes:
                    break
                last, total = n, total + int(length or 0)
            if last == after:
                return []
            rows = conn.execute(
                select(number, content)
                .select_from(table)
                .where(*where, number > after, number <= last)
                .order_by(number)
            ).all()
        if file.kind == "input":
            return [(n, text) for n, text in rows]
        return [(n, f"{text}\n") for n, text in rows]

    def delete_file(self, file_id: str, owner: str | None) -> None:
        """Delete a file (a batch already reading it keeps its own copy of the requests)."""
        with self.db.write() as conn:
            deleted = conn.execute(
                delete(files).where(
                    files.c.id == file_id, owned(files.c.owner, owner), files.c.status == PROCESSED
                )
            ).rowcount
            if not deleted:
                raise UnknownObjectError("file", file_id)
            conn.execute(delete(file_lines).where(file_lines.c.file_id == file_id))

    # -- batches -----------------------------------------------------------------------------

    def create_batch(
        self,
        owner: str | None,
        *,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        window_s: float,
        metadata: dict[str, str] | None,
        model: str,
        output_ttl_s: float | None = None,
    ) -> BatchRecord:
        """A new batch, validating, over one of the owner's uploaded files."""
        now = self.clock()
        batch_id = new_id("batch_")
        with self.db.write() as conn:
            file = self._visible_file(conn, input_file_id, owner)
            if file.kind != "input":
                raise WrongFileError(
                    f"file {input_file_id!r} is a batch's {file.kind} file; a batch reads a file "
                    "uploaded with purpose 'batch'"
                )
            conn.execute(
                insert(batches).values(
                    id=batch_id, owner=owner, endpoint=endpoint, input_file_id=input_file_id,
                    completion_window=completion_window, model=model, status=VALIDATING,
                    metadata=json.dumps(metadata) if metadata is not None else None,
                    total=file.lines, completed=0, failed=0, output_ttl_s=output_ttl_s,
                    created_at=now, expires_at=now + window_s,
                )
            )  # fmt: skip
            return self._batch(conn, batch_id, owner)

    def _visible_file(self, conn: Any, file_id: str, owner: str | None) -> FileRecord:
        # An expired file is gone for its owner at once, before cleanup deletes its rows.
        row = conn.execute(
            select(files).where(
                files.c.id == file_id, owned(files.c.owner, owner), files.c.status == PROCESSED,
                live(self.clock()),
            )
        ).first()  # fmt: skip
        if row is None:
            raise UnknownObjectError("file", file_id)
        return record(FileRecord, row)

    def _batch(self, conn: Any, batch_id: str, owner: str | None) -> BatchRecord:
        row = conn.execute(
            select(batches).where(batches.c.id == batch_id, owned(batches.c.owner, owner))
        ).first()
        if row is None:
            raise UnknownObjectError("batch", batch_id)
        return _counted(conn, [record(BatchRecord, row)])[0]

    def get_batch(self, batch_id: str, owner: str | None) -> BatchRecord:
        """One of the owner's batches."""
        with self.db.read() as conn:
            return self._batch(conn, batch_id, owner)

    def list_batches(
        self, owner: str | None, *, after: str | None, limit: int
    ) -> tuple[list[BatchRecord], bool]:
        """The owner's batches, newest first, after the batch `after`; and whether more follow."""
        with self.db.read() as conn:
            query = select(batches).where(owned(batches.c.owner, owner))
            if after is not None:
                seq = conn.execute(
                    select(batches.c.seq).where(
                        batches.c.id == after, owned(batches.c.owner, owner)
                    )
                ).scalar()
                if seq is None:
                    raise UnknownObjectError("batch", after)
                query = query.where(batches.c.seq < seq)
            rows = conn.execute(query.order_by(batches.c.seq.desc()).limit(limit + 1)).all()
            found = _counted(conn, [record(BatchRecord, row) for row in rows[:limit]])
        return found, len(rows) > limit

    def cancel_batch(self, batch_id: str, owner: str | None) -> BatchRecord:
        """Ask workers to stop a validating or in-progress batch (cancelling, then cancelled)."""
        with self.db.write() as conn:
            conn.execute(
                update(batches)
                .where(
                    batches.c.id == batch_id,
                    owned(batches.c.owner, owner),
                    batches.c.status.in_((VALIDATING, IN_PROGRESS)),
                )
                .values(status=CANCELLING, cancelling_at=self.clock())
            )
            batch = self._batch(conn, batch_id, owner)
        if batch.status not in (CANCELLING, CANCELLED):
            raise StateConflictError(
                f"batch {batch_id!r} is {batch.status}; only a validating or in_progress batch "
                "can be cancelled"
            )
        return batch

    def count_batches(self) -> dict[str, int]:
        """Batches in the store by status (every owner)."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(batches.c.status, func.count()).group_by(batches.c.status)
            ).all()
        counts = dict.fromkeys(STATUSES, 0)
        counts.update({status: int(n) for status, n in rows})
        return counts


def _counted(conn: Any, found: list[BatchRecord]) -> list[BatchRecord]:
    """Batches with the counts of their lines done so far: a running batch's row holds its
    counts only once it ends, so that writing a result never waits on the batch's row."""
    running = [b.id for b in found if b.status in (IN_PROGRESS, FINALIZING, CANCELLING)]
    if not running:
        return found
    c = batch_lines.c
    counts = {
        (batch_id, outcome): int(n)
        for batch_id, outcome, n in conn.execute(
            select(c.batch_id, c.outcome, func.count())
            .where(c.batch_id.in_(running), c.state == DONE)
            .group_by(c.batch_id, c.outcome)
        ).all()
    }
    return [
        dataclasses.replace(
            b, completed=counts.get((b.id, SUCCEEDED), 0), failed=counts.get((b.id, FAILED), 0)
        )
        if b.id in running
        else b
        for b in found
    ]
