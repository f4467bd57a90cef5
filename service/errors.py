"""Every error leaves as JSON `{"error": {"message", "type", "code"}}`, with no traceback."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.batcher import (
    BatcherClosedError,
    BatcherError,
    BatchFailedError,
    DeadlineExceededError,
    QueueFullError,
    RequestTooLargeError,
)
from service.documents import DocumentError, DocumentTooLongError
from service.state import get_state

log = logging.getLogger(__name__)

INVALID = "invalid_request_error"


class ApiError(Exception):
    """An error response; `reason` also counts it in linmod_rejections_total."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID,
        code: str,
        reason: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.reason = reason
        self.headers = dict(headers or {})


def error_body(message: str, type: str, code: str) -> dict[str, Any]:
    """The JSON body of an error."""
    return {"error": {"message": message, "type": type, "code": code}}


def from_classify_error(exc: BatcherError | DocumentError) -> ApiError:
    """The HTTP face of what classifying can raise."""
    if isinstance(exc, DocumentTooLongError):
        return ApiError(413, str(exc), code="document_too_long", reason="too_large")
    if isinstance(exc, DocumentError):
        return ApiError(422, str(exc), code="invalid_input", reason="invalid")
    if isinstance(exc, RequestTooLargeError):
        return ApiError(413, str(exc), code="request_too_large", reason="too_large")
    if isinstance(exc, QueueFullError):
        headers = {"Retry-After": str(exc.retry_after)}
        msg = f"the server is busy ({exc}); retry after {exc.retry_after} s"
        return ApiError(429, msg, type="rate_limit_error", code="queue_full", headers=headers)
    if isinstance(exc, DeadlineExceededError):
        return ApiError(504, str(exc), type="timeout_error", code="deadline_exceeded")
    if isinstance(exc, BatchFailedError):
        return ApiError(500, str(exc), type="server_error", code="inference_failed")
    if isinstance(exc, BatcherClosedError):
        return ApiError(
            503, str(exc), type="service_unavailable", code="shutting_down",
            reason="shutting_down", headers={"Retry-After": "1"},
        )  # fmt: skip
    return ApiError(500, "internal error", type="server_error", code="internal_error")


def _respond(request: Request, error: ApiError) -> JSONResponse:
    if error.reason:
        get_state(request.app).metrics.rejections.labels(error.reason).inc()
    body = error_body(error.message, error.type, error.code)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def _describe(errors: Any) -> str:
    parts = []
    for err in list(errors)[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        elif err.get("type") == "missing":
            msg = "field required"
        parts.append(msg if msg.startswith(loc.split(".")[0]) else f"{loc}: {msg}")
    more = len(list(errors)) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return _respond(request, exc)


def validation_error(errors: Sequence[Any]) -> ApiError:
    """The 400 (not JSON) or 422 (not a valid request) for a body that failed validation."""
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = errors[0].get("ctx", {}).get("error", "")
        return ApiError(
            400, f"the body is not valid JSON: {detail}", code="invalid_json", reason="invalid"
        )
    return ApiError(
        422, f"invalid request: {_describe(errors)}", code="invalid_input", reason="invalid"
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _respond(request, validation_error(exc.errors()))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status, headers = exc.status_code, dict(exc.headers or {})
    reason: str | None = None
    if status == 404:
        message, code = f"no route {request.method} {request.url.path}", "not_found"
    elif status == 405:
        message, code = f"method {request.method} not allowed here", "method_not_allowed"
    elif status == 413:
        message, code, reason = str(exc.detail), "body_too_large", "too_large"
    elif status == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
        message, code, reason = "the body is not valid UTF-8", "invalid_encoding", "invalid"
    elif status == 400:
        message, code, reason = f"malformed request: {exc.detail}", "invalid_request", "invalid"
    else:
        message, code = str(exc.detail), f"http_{status}"
    error = ApiError(status, message, code=code, reason=reason, headers=headers)
    return _respond(request, error)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the log, never to the client.
    log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
    body = error_body("internal server error", "server_error", "internal_error")
    headers = {"x-request-id": str(request.scope.get("state", {}).get("request_id", ""))}
    return JSONResponse(body, status_code=500, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Route every kind of failure to the JSON error shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
