"""/v1/files: the OpenAI Files API for batch jobs (upload a JSONL file, read its metadata and
content, delete it); also what the batch routes share: the jobs dependency and store errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from service.errors import ApiError
from service.jobs.schemas import FileDeleted, FileObject, file_object
from service.jobs.store import (
    JobStore,
    JobStoreError,
    QuotaExceededError,
    StateConflictError,
    UnknownObjectError,
    WrongFileError,
)
from service.jobs.upload import receive_file
from service.jobs.worker import JobWorker
from service.routes.deps import ApiKeyDep, StateDep, api_key
from service.schemas import ERROR_RESPONSES
from service.texts import SafeStr, content_disposition

T = TypeVar("T")
CONTENT_PAGE = 1000  # lines per read while streaming a file's content, at most
CONTENT_PAGE_BYTES = 256 * 1024  # and bytes per read (unless one line is longer)


def jobs(state: StateDep) -> JobWorker:
    """The jobs worker and its store; 503 until it has opened the database."""
    worker = state.jobs
    if worker is None or worker.store is None:
        raise ApiError(
            503, "batch jobs are not running yet", type="service_unavailable",
            code="not_ready", reason="not_ready", headers={"Retry-After": "1"},
        )  # fmt: skip
    return worker


JobsDep = Annotated[JobWorker, Depends(jobs)]


async def call(worker: JobWorker, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a store call off the event loop; its errors become 4xx responses."""
    assert worker.db is not None
    try:
        return await worker.db.run(fn, *args, **kwargs)
    except UnknownObjectError as exc:
        raise ApiError(404, str(exc), code=f"{exc.kind}_not_found") from exc
    except StateConflictError as exc:
        raise ApiError(409, str(exc), code="invalid_state") from exc
    except QuotaExceededError as exc:
        raise ApiError(403, str(exc), code=exc.code, reason="invalid") from exc
    except WrongFileError as exc:
        raise ApiError(400, str(exc), code="invalid_input_file", reason="invalid") from exc
    except JobStoreError as exc:
        raise ApiError(400, str(exc), code="invalid_request", reason="invalid") from exc


def store_of(worker: JobWorker) -> JobStore:
    """The worker's store (the dependency has checked it is open)."""
    assert worker.store is not None
    return worker.store


router = APIRouter(
    prefix="/v1", tags=["files"], dependencies=[Depends(api_key)], responses=ERROR_RESPONSES
)

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "JSONL: {custom_id, method, url, body} per line",
                        },
                        "purpose": {"type": "string", "enum": ["batch"]},
                    },
                }
            }
        },
    }
}


@router.post("/files", response_model=FileObject, openapi_extra=_UPLOAD_BODY)
async def upload_file(
    request: Request, worker: JobsDep, owner: ApiKeyDep, state: StateDep
) -> FileObject:
    """Upload a JSONL file of requests (purpose `batch`); it is stored as it streams in."""
    record = await receive_file(request, store_of(worker), owner, state.settings)
    return file_object(record)


@router.get("/files/{file_id}", response_model=FileObject)
async def retrieve_file(file_id: SafeStr, worker: JobsDep, owner: ApiKeyDep) -> FileObject:
    """A file's metadata."""
    return file_object(await call(worker, store_of(worker).get_file, file_id, owner))


@router.get("/files/{file_id}/content", response_class=StreamingResponse)
async def file_content(file_id: SafeStr, worker: JobsDep, owner: ApiKeyDep) -> StreamingResponse:
    """A file's bytes: an upload as it was sent, or a batch's output or error lines."""
    store = store_of(worker)
    record = await call(worker, store.get_file, file_id, owner)

    async def pages() -> AsyncIterator[bytes]:
        after = 0
        while page := await call(
            worker, store.read_content, record, after, CONTENT_PAGE, CONTENT_PAGE_BYTES
        ):
            after = page[-1][0]
            yield "".join(text for _, text in page).encode()

    headers = {"content-disposition": content_disposition(record.filename)}
    return StreamingResponse(pages(), media_type="application/jsonl", headers=headers)


@router.delete("/files/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: SafeStr, worker: JobsDep, owner: ApiKeyDep) -> FileDeleted:
    """Delete a file; a batch already running from it goes on."""
    await call(worker, store_of(worker).delete_file, file_id, owner)
    return FileDeleted(id=file_id, deleted=True)
