"""A route class for hot endpoints that read their own body and options: FastAPI still builds
their OpenAPI entry, but a request skips its per-request dependency solving and response
validation (about a fifth of the event loop's time per small request). The router's
dependencies must be ones `DirectRoute` knows how to run as plain calls.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from service.routes.deps import api_key, bearer_credentials

Endpoint = Callable[[Request, Response], Awaitable[Response]]


class DirectRoute(APIRoute):
    """An endpoint `(request, response) -> Response` called directly, after the API-key check
    its router declares (`Depends(api_key)`), as FastAPI would have run it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        d = self.dependant
        calls = {dep.call for dep in d.dependencies}
        params = d.path_params + d.query_params + d.header_params + d.cookie_params + d.body_params
        if calls - {api_key} or params:
            raise TypeError(f"{self.path}: DirectRoute runs only api_key and (request, response)")
        endpoint: Endpoint = self.endpoint
        check_key = api_key in calls

        async def handler(request: Request) -> Response:
            if check_key:
                await api_key(request, await bearer_credentials(request))
            # The sub-response a route sets headers on, as FastAPI makes it.
            response = Response()
            del response.headers["content-length"]
            return await endpoint(request, response)

        return handler
