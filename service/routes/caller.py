"""The request path of the classify routes: limits, the request's deadline, the client going
away, classifier errors as HTTP errors, and the timing headers.
"""

from __future__ import annotations

import asyncio

from fastapi import Request, Response

from service.batcher import BatcherError
from service.classifier import Classification, Classifier
from service.documents import DocumentError
from service.errors import ApiError, from_classify_error
from service.middleware import started_at
from service.responses import check_limits
from service.settings import Aggregation, LongDocumentPolicy, Settings

WATCH_AFTER_S = 0.02  # how long a request runs before its client's disconnect is watched for


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next message is the client's disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def classify_for_caller(
    request: Request,
    response: Response,
    classifier: Classifier,
    settings: Settings,
    texts: list[str],
    *,
    long_document: LongDocumentPolicy | None,
    aggregation: Aggregation | None,
    evidence: bool = False,
) -> Classification:
    """Classify for an HTTP caller: limits, deadline, disconnects, errors and timing headers."""
    check_limits(texts, settings)
    arrived = started_at(request.scope) or asyncio.get_running_loop().time()
    deadline = arrived + settings.request_timeout_s
    # The classification runs in this task; a watcher cancels it if the client goes away.
    this = asyncio.current_task()
    assert this is not None
    left = False

    def client_left(watcher: asyncio.Future[None]) -> None:
        nonlocal left
        if not watcher.cancelled() and watcher.exception() is None:
            left = True
            this.cancel()

    gone: asyncio.Future[None] | None = None

    def watch() -> None:
        nonlocal gone
        gone = asyncio.ensure_future(_disconnected(request))
        gone.add_done_callback(client_left)

    # Most requests are answered before a client could go: the watcher starts only for the
    # ones still running after WATCH_AFTER_S (a task and two loop turns saved on the others).
    starting = asyncio.get_running_loop().call_later(WATCH_AFTER_S, watch)
    try:
        outcome = await classifier.classify(
            texts,
            long_document=long_document or settings.long_document,
            aggregation=aggregation,
            deadline=deadline,
            evidence=evidence,
        )
    except asyncio.CancelledError:
        if not left:
            raise  # the server stops
        # The client has gone: its windows have left the queue.
        this.uncancel()
        raise ApiError(499, "the client closed the request", code="client_closed") from None
    except (BatcherError, DocumentError) as exc:
        raise from_classify_error(exc) from exc
    finally:
        starting.cancel()
        if gone is not None:
            gone.remove_done_callback(client_left)
            gone.cancel()
    response.headers["x-tokenization-time-ms"] = f"{outcome.tokenize_s * 1000:.2f}"
    response.headers["x-queue-time-ms"] = f"{outcome.queue_s * 1000:.2f}"
    response.headers["x-inference-time-ms"] = f"{outcome.inference_s * 1000:.2f}"
    return outcome
