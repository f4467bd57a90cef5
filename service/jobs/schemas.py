"""Bodies of the Files and Batches API, in OpenAI's shapes, and their making from store records."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.jobs.records import BatchRecord, FileRecord
from service.texts import SafeStr

Endpoint = Literal["/v1/moderations", "/v1/classify"]
# OpenAI accepts only 24h; the window is how long a batch may run before it expires.
COMPLETION_WINDOWS = {"24h": 24 * 3600.0}


class FileObject(BaseModel):
    """An uploaded file, or the output or error file of a batch."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int | None
    filename: str
    purpose: Literal["batch", "batch_output"]
    status: Literal["processed"] = "processed"
    status_details: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class ExpiresAfter(BaseModel):
    """When a batch's output and error files expire."""

    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"]
    seconds: int = Field(ge=3600, le=30 * 24 * 3600)


class BatchCreate(BaseModel):
    """A new batch over an uploaded file."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: SafeStr = Field(description="a file uploaded with purpose 'batch'")
    endpoint: Endpoint = Field(description="the endpoint every line of the file calls")
    completion_window: Literal["24h"] = Field(description="how long the batch may run")
    metadata: dict[SafeStr, SafeStr] | None = Field(None, description="up to 16 key-value pairs")
    output_expires_after: ExpiresAfter | None = None

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > 16:
            raise ValueError("metadata holds at most 16 pairs")
        for key, item in value.items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError("metadata keys are at most 64 characters, values at most 512")
        return value


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchErrorEntry(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchErrorEntry]


class Batch(BaseModel):
    """A batch job: its status, counts and files."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: Literal[
        "validating", "failed", "in_progress", "finalizing", "completed", "expired",
        "cancelling", "cancelled",
    ]  # fmt: skip
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: str | None
    last_id: str | None
    has_more: bool


def _seconds(value: float | None) -> int | None:
    return None if value is None else int(value)


def file_object(file: FileRecord) -> FileObject:
    """The API view of a stored file."""
    return FileObject(
        id=file.id,
        bytes=file.bytes,
        created_at=int(file.created_at),
        expires_at=_seconds(file.expires_at),
        filename=file.filename,
        purpose="batch" if file.kind == "input" else "batch_output",
    )


def batch_object(batch: BatchRecord) -> Batch:
    """The API view of a stored batch."""
    errors: Any = json.loads(batch.errors) if batch.errors else None
    times = {
        name: _seconds(getattr(batch, name))
        for name in (
            "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
            "expired_at", "cancelling_at", "cancelled_at",
        )
    }  # fmt: skip
    return Batch(
        id=batch.id,
        endpoint=batch.endpoint,
        model=batch.model,
        errors=BatchErrors(data=errors) if errors else None,
        input_file_id=batch.input_file_id,
        completion_window=batch.completion_window,
        status=batch.status,
        output_file_id=batch.output_file_id,
        error_file_id=batch.error_file_id,
        created_at=int(batch.created_at),
        request_counts=RequestCounts(
            total=batch.total, completed=batch.completed, failed=batch.failed
        ),
        metadata=json.loads(batch.metadata) if batch.metadata else None,
        **times,
    )
