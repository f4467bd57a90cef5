"""API keys: where they come from, how a request's key is checked, and which routes stay open.

The check runs as ASGI middleware, before any route reads the body, so a request without a valid
key gets 401 whatever it sends. With keys configured, these routes stay open:

- `/health`, `/ready`: probes of load balancers and orchestrators;
- `/metrics`: Prometheus scrapes;
- `/info`, `/docs`, `/docs/oauth2-redirect`, `/redoc`, `/openapi.json`, `/playground` (a page
  that holds no data; its calls carry the key typed into it): unless `public_info` is off
  (`--no-public-info`), then they need a key too.

Every other path, unknown ones included, needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import error_body
from service.metrics import Metrics
from service.settings import Settings

ALWAYS_OPEN = frozenset({"/health", "/ready", "/metrics"})
INFO_ROUTES = frozenset(
    {"/info", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/playground"}
)
KEY_ID = "linmod_key_id"  # where the middleware leaves the caller's key id in scope["state"]
UNAUTHORIZED_MESSAGE = "a valid API key is required: send 'Authorization: Bearer <key>'"


def key_id(key: str) -> str:
    """A stable, non-secret name for an API key (what owns files and batches)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def match_key(authorization: str, keys: Sequence[str]) -> str | None:
    """The key id of a `Bearer <key>` header value, or None when it names no configured key."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    presented = token.strip().encode()
    # Compare with every key, in constant time, so timing reveals nothing about them.
    matches = [hmac.compare_digest(presented, key.encode()) for key in keys]
    return key_id(presented.decode()) if any(matches) else None


def open_paths(settings: Settings) -> frozenset[str]:
    """Paths served without a key."""
    return ALWAYS_OPEN | INFO_ROUTES if settings.public_info else ALWAYS_OPEN


def unauthorized() -> JSONResponse:
    """The 401 for a missing or wrong key."""
    body = error_body(UNAUTHORIZED_MESSAGE, "authentication_error", "invalid_api_key")
    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})


class ApiKeyMiddleware:
    """401 before the route runs (and before its body is read) unless the path is open or the
    request carries a configured key; the key's id is left in the request's state."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics) -> None:
        self.app = app
        self.keys = list(settings.api_keys)
        self.open = open_paths(settings)
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in self.open:
            await self.app(scope, receive, send)
            return
        found = match_key(Headers(scope=scope).get("authorization", ""), self.keys)
        if found is None:
            self.metrics.rejections.labels("unauthorized").inc()
            await unauthorized()(scope, receive, send)
            return
        scope.setdefault("state", {})[KEY_ID] = found
        await self.app(scope, receive, send)
