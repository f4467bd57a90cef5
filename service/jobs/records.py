"""What the job tables hold, as the rest of the service sees it: batch and line statuses, the
file and batch records, owner and expiry filters, and the store's errors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Row, or_

from service.jobs.db import files

VALIDATING, IN_PROGRESS, FINALIZING = "validating", "in_progress", "finalizing"
COMPLETED, FAILED, EXPIRED = "completed", "failed", "expired"
CANCELLING, CANCELLED = "cancelling", "cancelled"
ACTIVE = (VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING)
STATUSES = (*ACTIVE, COMPLETED, FAILED, EXPIRED, CANCELLED)
PENDING, CLAIMED, DONE = "pending", "claimed", "done"  # a line's state
SUCCEEDED = "succeeded"  # a line's outcome: succeeded or failed
UPLOADING, PROCESSED = "uploading", "processed"

R = TypeVar("R")


class JobStoreError(Exception):
    """Something the caller asked for that the store cannot do."""


class UnknownObjectError(JobStoreError):
    """No such file or batch, or not the caller's."""

    def __init__(self, kind: str, object_id: str) -> None:
        super().__init__(f"no {kind} {object_id!r}")
        self.kind = kind


class StateConflictError(JobStoreError):
    """The batch's status does not allow this."""


class WrongFileError(JobStoreError):
    """The file exists but cannot be used this way."""


class QuotaExceededError(JobStoreError):
    """The key already holds as many files, or bytes, as its quota allows."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Quota:
    """What one key may keep uploaded at once (expired files do not count)."""

    files: int
    bytes: int


NO_QUOTA = Quota(files=2**62, bytes=2**62)


@dataclass(frozen=True)
class FileRecord:
    id: str
    owner: str | None
    purpose: str
    kind: str  # input | output | error
    filename: str
    bytes: int
    lines: int
    status: str
    batch_id: str | None
    created_at: float
    expires_at: float | None


@dataclass(frozen=True)
class BatchRecord:
    id: str
    owner: str | None
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: str | None
    model: str
    status: str
    errors: str | None
    total: int
    completed: int
    failed: int
    output_file_id: str | None
    error_file_id: str | None
    output_ttl_s: float | None
    created_at: float
    expires_at: float
    in_progress_at: float | None
    finalizing_at: float | None
    completed_at: float | None
    failed_at: float | None
    expired_at: float | None
    cancelling_at: float | None
    cancelled_at: float | None


def record(cls: type[R], row: Row[Any]) -> R:
    """A record dataclass from a table row (extra columns ignored)."""
    mapping = row._mapping
    return cls(**{f.name: mapping[f.name] for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


def live(now: float) -> ColumnElement[bool]:
    """Files not expired at `now` (an upload in progress has no expiry yet)."""
    return or_(files.c.expires_at.is_(None), files.c.expires_at > now)


def owned(column: Any, owner: str | None) -> ColumnElement[bool]:
    """Rows of this owner (NULL when the server has no API keys)."""
    result: ColumnElement[bool] = column.is_(None) if owner is None else column == owner
    return result


def quota_message(used: int, quota: Quota) -> str:
    """Why an upload over the byte quota was refused."""
    return (
        f"this key's files would take more than its {quota.bytes} bytes of storage ({used} in "
        "use); delete some (DELETE /v1/files/{id}) or wait for them to expire"
    )
