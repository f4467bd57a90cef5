"""DirectRoute: /v1/classify without FastAPI's per-request dependency solving keeps its OpenAPI
entry and its key check, and a route it cannot run faithfully is refused when it is built."""

from __future__ import annotations

from typing import Annotated

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response

from service.routes.deps import api_key
from service.routes.direct import DirectRoute


async def test_classify_keeps_its_schema_security_and_sub_response_headers(
    fake_client: httpx.AsyncClient,
) -> None:
    spec = (await fake_client.get("/openapi.json")).json()
    post = spec["paths"]["/v1/classify"]["post"]
    assert post["security"] == [{"HTTPBearer": []}]
    assert "200" in post["responses"] and "requestBody" in post
    answer = await fake_client.post("/v1/classify", json={"input": "hello"})
    assert answer.status_code == 200, answer.text
    # Headers set on the sub-response reach the answer; its placeholder length does not.
    assert float(answer.headers["x-inference-time-ms"]) >= 0
    assert answer.headers["content-length"] == str(len(answer.content))


def test_a_route_with_parameters_or_other_dependencies_is_refused() -> None:
    async def extra() -> None:
        return None

    async def with_query(
        request: Request, response: Response, q: Annotated[str, Query()]
    ) -> Response:
        return response

    async def plain(request: Request, response: Response) -> Response:
        return response

    for endpoint, dependencies in ((with_query, [Depends(api_key)]), (plain, [Depends(extra)])):
        router = APIRouter(route_class=DirectRoute, dependencies=dependencies)
        with pytest.raises(TypeError, match="DirectRoute"):
            router.add_api_route("/x", endpoint, methods=["POST"])
            FastAPI().include_router(router)
