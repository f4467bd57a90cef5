"""/v1/files: the OpenAI Files API for batch jobs (upload a JSONL file, read its metadata and
content, delete it); also what the batch routes share: the store dependency and its errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from service.errors import ApiError
from service.jobs.records import (
    JobStoreError,
    QuotaExceededError,
    StateConflictError,
    UnknownObjectError,
    WrongFileError,
)
from service.jobs.schemas import FileDeleted, FileObject, file_object
from service.jobs.store import JobStore
from service.jobs.upload import receive_file
from service.routes.deps import ApiKeyDep, StateDep, api_key, unavailable
from service.schemas import ERROR_RESPONSES
from service.texts import SafeStr, content_disposition

T = TypeVar("T")
CONTENT_PAGE = 1000  # lines per read while streaming a file's content, at most
CONTENT_PAGE_BYTES = 256 * 1024  # and bytes per read (unless one line is longer)


async def job_store(state: StateDep) -> JobStore:
    """The app's job store; 503 until the lifespan has opened it and the worker runs."""
    if state.store is None or state.jobs is None:
        raise unavailable("batch jobs are not running yet", "not_ready")
    return state.store


StoreDep = Annotated[JobStore, Depends(job_store)]


async def call(store: JobStore, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a store call on the store's threads; its errors become 4xx responses."""
    try:
        return await store.db.run(fn, *args, **kwargs)
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
    request: Request, store: StoreDep, owner: ApiKeyDep, state: StateDep
) -> FileObject:
    """Upload a JSONL file of requests (purpose `batch`); it is stored as it streams in."""
    record = await receive_file(request, store, owner, state.settings)
    return file_object(record)


@router.get("/files/{file_id}", response_model=FileObject)
async def retrieve_file(file_id: SafeStr, store: StoreDep, owner: ApiKeyDep) -> FileObject:
    """A file's metadata."""
    return file_object(await call(store, store.get_file, file_id, owner))


@router.get("/files/{file_id}/content", response_class=StreamingResponse)
async def file_content(file_id: SafeStr, store: StoreDep, owner: ApiKeyDep) -> StreamingResponse:
    """A file's bytes: an upload as it was sent, or a batch's output or error lines."""
    record = await call(store, store.get_file, file_id, owner)

    async def pages() -> AsyncIterator[bytes]:
        after = 0
        while page := await call(
            store, store.read_content, record, after, CONTENT_PAGE, CONTENT_PAGE_BYTES
        ):
            after = page[-1][0]
            yield "".join(text for _, text in page).encode()

    headers = {"content-disposition": content_disposition(record.filename)}
    return StreamingResponse(pages(), media_type="application/jsonl", headers=headers)


@router.delete("/files/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: SafeStr, store: StoreDep, owner: ApiKeyDep) -> FileDeleted:
    """Delete a file; a batch already running from it goes on."""
    await call(store, store.delete_file, file_id, owner)
    return FileDeleted(id=file_id, deleted=True)
