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
    work = asyncio.ensure_future(
        classifier.classify(
            texts,
            long_document=long_document or settings.long_document,
            aggregation=aggregation,
            deadline=deadline,
            evidence=evidence,
        )
    )
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            # The client has gone (or the server stops): its windows leave the queue.
            work.cancel()
            await asyncio.wait({work})
    if work.cancelled():
        raise ApiError(499, "the client closed the request", code="client_closed")
    try:
        outcome = work.result()
    except (BatcherError, DocumentError) as exc:
        raise from_classify_error(exc) from exc
    response.headers["x-tokenization-time-ms"] = f"{outcome.tokenize_s * 1000:.2f}"
    response.headers["x-queue-time-ms"] = f"{outcome.queue_s * 1000:.2f}"
    response.headers["x-inference-time-ms"] = f"{outcome.inference_s * 1000:.2f}"
    return outcome
