"""/v1/batches: the OpenAI Batches API (create, retrieve, list, cancel) over uploaded files."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from service.jobs.schemas import COMPLETION_WINDOWS, Batch, BatchCreate, BatchList, batch_object
from service.routes.deps import ApiKeyDep, StateDep, api_key, require_json
from service.routes.files import StoreDep, call
from service.schemas import ERROR_RESPONSES
from service.state import ServiceState
from service.texts import SafeStr

router = APIRouter(
    prefix="/v1",
    tags=["batches"],
    dependencies=[Depends(api_key)],
    responses={
        **ERROR_RESPONSES,
        404: {"description": "no such batch or file, or another key's"},
        409: {"description": "the batch's status does not allow it"},
    },
)


@router.post("/batches", response_model=Batch, dependencies=[Depends(require_json)])
async def create_batch(
    body: BatchCreate, store: StoreDep, owner: ApiKeyDep, state: StateDep
) -> Batch:
    """Start a batch: every line of the input file calls `endpoint`; poll it until it ends."""
    ttl = body.output_expires_after.seconds if body.output_expires_after else None
    record = await call(
        store,
        store.create_batch,
        owner,
        input_file_id=body.input_file_id,
        endpoint=body.endpoint,
        completion_window=body.completion_window,
        window_s=COMPLETION_WINDOWS[body.completion_window],
        metadata=body.metadata,
        model=state.model_name,
        output_ttl_s=ttl,
    )
    _wake_worker(state)
    return batch_object(record)


@router.get("/batches/{batch_id}", response_model=Batch)
async def retrieve_batch(batch_id: SafeStr, store: StoreDep, owner: ApiKeyDep) -> Batch:
    """A batch's status, request counts and files."""
    return batch_object(await call(store, store.get_batch, batch_id, owner))


@router.get("/batches", response_model=BatchList)
async def list_batches(
    store: StoreDep,
    owner: ApiKeyDep,
    after: Annotated[
        SafeStr | None, Query(description="the last batch id of the previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="batches per page")] = 20,
) -> BatchList:
    """Your batches, newest first."""
    records, has_more = await call(store, store.list_batches, owner, after=after, limit=limit)
    data = [batch_object(r) for r in records]
    return BatchList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=has_more,
    )


@router.post("/batches/{batch_id}/cancel", response_model=Batch)
async def cancel_batch(
    batch_id: SafeStr, store: StoreDep, owner: ApiKeyDep, state: StateDep
) -> Batch:
    """Stop a batch: lines running finish, the rest go to the error file (cancelling, then
    cancelled); 409 for a batch that has already ended."""
    record = await call(store, store.cancel_batch, batch_id, owner)
    _wake_worker(state)
    return batch_object(record)


def _wake_worker(state: ServiceState) -> None:
    """This replica's worker looks for work now rather than at its next poll."""
    if state.jobs is not None:
        state.jobs.wake()
