"""Per-request bookkeeping in plain ASGI: request id, total time, HTTP metrics, access log."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Mapping

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.admission import Budget
from service.errors import INVALID, error_body
from service.metrics import Metrics

log = logging.getLogger("linmod.access")

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
UNMATCHED = "unmatched"  # one label for every unknown path, so scanners cannot grow the series
# Scrapes and probes arrive every few seconds; logging each at info would drown the rest.
QUIET_ROUTES = frozenset({"/metrics", "/health", "/ready"})
# h11 accepts any token as a method; metric labels take these and "other", so none can grow.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# The interactive docs page loads its script and styles; API answers are never to be cached.
CACHEABLE = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc"})


def method_label(method: str) -> str:
    """The method as a metric label: one of METHODS, else "other"."""
    return method if method in METHODS else "other"


def started_at(scope: Scope) -> float | None:
    """The event loop's time() when this request arrived, if the middleware saw it."""
    value = scope.get("state", {}).get("started_at")
    return float(value) if isinstance(value, int | float) else None


def request_id(scope: Scope) -> str:
    """The id of the request in this scope."""
    return str(scope.get("state", {}).get("request_id", ""))


class LogSampler:
    """Takes `rate` of the calls, evenly spaced (the first one included): at 0.01, one in a
    hundred. Deterministic, so a log's volume is what was asked for, at any traffic."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._credit = 1.0 - rate  # the first call is taken

    def take(self) -> bool:
        if self.rate >= 1.0 or self.rate <= 0.0:
            return self.rate >= 1.0
        self._credit += self.rate
        if self._credit >= 1.0 - 1e-9:
            self._credit -= 1.0
            return True
        return False


class RequestContextMiddleware:
    """Gives each request an id (a client's own x-request-id if sane) and measures it; logs
    it, every error and `access_log_sample` of the rest."""

    def __init__(self, app: ASGIApp, metrics: Metrics, access_log_sample: float = 1.0) -> None:
        self.app = app
        self.metrics = metrics
        self.sampler = LogSampler(access_log_sample)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = Headers(scope=scope).get("x-request-id", "")
        rid = offered if _CLIENT_ID.match(offered) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        start = time.perf_counter()
        # Deadlines count from here, so reading and parsing the body is inside them.
        scope["state"]["started_at"] = asyncio.get_running_loop().time()
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = rid
                headers["x-total-time-ms"] = f"{(time.perf_counter() - start) * 1000:.2f}"
                headers["x-content-type-options"] = "nosniff"
                if scope["path"] not in CACHEABLE and "cache-control" not in headers:
                    headers["cache-control"] = "no-store"
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            seconds = time.perf_counter() - start
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED
            method = method_label(scope["method"])
            self.metrics.http_requests.labels(template, method, str(status)).inc()
            self.metrics.http_duration.labels(template, method).observe(seconds)
            quiet = template in QUIET_ROUTES and status < 400
            level = logging.DEBUG if quiet else logging.INFO
            sampled = status < 400 and not quiet  # errors and probes are never sampled away
            if log.isEnabledFor(level) and (not sampled or self.sampler.take()):
                extra = {
                    "request_id": rid,
                    "method": method,
                    "path": scope["path"],
                    "route": template,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 2),
                }
                if sampled and self.sampler.rate < 1.0:
                    extra["sample_rate"] = self.sampler.rate
                log.log(level, "request", extra=extra)


class BodyLimitMiddleware:
    """413 for a body over the limit without reading it: at once when Content-Length says so,
    else as soon as the bytes received pass the limit. `overrides` maps path prefixes to
    their own limits (file uploads); it is read per request, so it may be filled after start.
    """

    def __init__(
        self, app: ASGIApp, limit: int, metrics: Metrics, overrides: Mapping[str, int]
    ) -> None:
        self.app = app
        self.limit = limit
        self.metrics = metrics
        self.overrides = overrides

    def _limit_for(self, path: str) -> int:
        matches = [prefix for prefix in self.overrides if path.startswith(prefix)]
        return self.overrides[max(matches, key=len)] if matches else self.limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit_for(scope["path"])
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            self.metrics.rejections.labels("too_large").inc()
            body = error_body(f"the body is over {limit} bytes", INVALID, "body_too_large")
            await JSONResponse(body, status_code=413)(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # FastAPI passes HTTPExceptions from body reading on to the error handlers.
                    raise StarletteHTTPException(413, f"the body is over {limit} bytes")
            return message

        await self.app(scope, counting_receive, send)


class BodyAdmissionMiddleware:
    """Bodies over `small` bytes on `paths` share `limit` bytes in flight (declared length, or
    the full limit when undeclared), held until the response ends; 429 without reading the body,
    after `refusal_delay_s`, when there is no room. A large body read and then refused as too
    large (413) is answered after `refusal_delay_s` too, holding its share meanwhile, so a
    client cannot keep the host parsing such bodies back to back. Smaller bodies pass: the
    batcher's queue bounds them."""

    def __init__(
        self,
        app: ASGIApp,
        paths: frozenset[str],
        limit: int,
        small: int,
        metrics: Metrics,
        refusal_delay_s: float = 0.0,
    ) -> None:
        self.app = app
        self.paths = paths
        self.budget = Budget(limit)
        self.small = small
        self.metrics = metrics
        self.refusal_delay_s = refusal_delay_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        size = int(declared) if declared.isdigit() else self.budget.limit
        if size <= self.small:
            await self.app(scope, receive, send)
            return
        cost = min(size, self.budget.limit)
        if not self.budget.try_acquire(cost):
            self.metrics.rejections.labels("queue_full").inc()
            # The refusal waits a moment (a timer, no work): a client that retries at once,
            # whatever Retry-After says, then cycles slower, and each cycle (a connection, a
            # body sent into the socket, the reset that discards it) costs the host CPU.
            await asyncio.sleep(self.refusal_delay_s)
            message = "the server is busy with large requests; retry after 1 s"
            body = error_body(message, "rate_limit_error", "queue_full")
            response = JSONResponse(
                body, status_code=429, headers={"Retry-After": "1", "Connection": "close"}
            )
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        async def send_refusal_late(message: Message) -> None:
            # A large body read and then refused as too large (413) cost the host its read and
            # parse. Its answer waits as a 429's does, still holding its share: a client that
            # resends such a body at once cannot keep the host parsing them back to back.
            # A 413 from the declared length alone (nothing read) goes out at once.
            if (
                message["type"] == "http.response.start"
                and message["status"] == 413
                and received > self.small
            ):
                await asyncio.sleep(self.refusal_delay_s)
            await send(message)

        try:
            await self.app(scope, counting_receive, send_refusal_late)
        finally:
            self.budget.release(cost)
