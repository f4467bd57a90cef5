"""Bad input gets a 4xx with a clear JSON error, never a 500, and the server keeps serving."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

JSON = {"content-type": "application/json"}


def error_of(response: httpx.Response) -> dict[str, str]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "code"}, body
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


async def still_serving(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/classify", json={"input": "still there?"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"input": 42}, 422, "a string or a list of strings, not int"),
        ({"input": None}, 422, "not NoneType"),
        ({"input": {"text": "x"}}, 422, "not dict"),
        ({"input": ["ok", 7]}, 422, "input[1] must be a string, not int"),
        ({"input": []}, 422, "empty list"),
        ({"input": ""}, 422, "empty string"),
        ({"input": ["a", ""]}, 422, "input[1] is an empty string"),
        ({"input": "a\u0000b"}, 422, "NUL"),
        ({"input": "a", "temperature": 1}, 422, "temperature: unknown field"),
        ({"text": "a"}, 422, "input: field required"),
        ({"input": "a", "long_document": "summarize"}, 422, "long_document"),
        ([1, 2], 422, "invalid request"),
        ("just a string", 422, "invalid request"),
    ],
)
async def test_malformed_json_values(
    fake_client: httpx.AsyncClient, body: object, status: int, fragment: str
) -> None:
    response = await fake_client.post("/v1/classify", json=body)
    assert response.status_code == status, response.text
    error = error_of(response)
    assert fragment in error["message"] and error["type"] == "invalid_request_error"
    await still_serving(fake_client)


@pytest.mark.parametrize(
    ("content", "headers", "status", "code"),
    [
        (b'{"input": "caf\xe9"}', JSON, 400, "invalid_encoding"),
        (b'{"input": "a\x00b"}', JSON, 400, "invalid_json"),
        (b'{"input": "unterminated', JSON, 400, "invalid_json"),
        (b"", JSON, 422, "invalid_input"),
        (b"input=hello", {"content-type": "application/x-www-form-urlencoded"}, 415, None),
        (b'{"input": "hello"}', {"content-type": "text/plain"}, 415, "unsupported_media_type"),
        (b'{"input": "hello"}', {}, 415, "unsupported_media_type"),
    ],
)
async def test_malformed_bodies(
    fake_client: httpx.AsyncClient, content: bytes, headers: dict[str, str], status: int, code: str
) -> None:
    response = await fake_client.post("/v1/classify", content=content, headers=headers)
    assert response.status_code == status, response.text
    error = error_of(response)
    assert code is None or error["code"] == code
    await still_serving(fake_client)


async def test_a_10_mb_body_is_refused_unread(fake_client: httpx.AsyncClient) -> None:
    big = b'{"input": "' + b"a" * (10 * 1024 * 1024) + b'"}'
    response = await fake_client.post("/v1/classify", content=big, headers=JSON)
    assert response.status_code == 413
    assert error_of(response)["code"] == "body_too_large"

    async def chunks() -> AsyncIterator[bytes]:
        # No Content-Length: the limit applies to the bytes as they arrive.
        for _ in range(10):
            yield b"a" * (1024 * 1024)

    streamed = await fake_client.post("/v1/classify", content=chunks(), headers=JSON)
    assert streamed.status_code == 413
    assert "4194304 bytes" in error_of(streamed)["message"]
    await still_serving(fake_client)


async def test_too_many_inputs_and_too_long_texts(fake_client: httpx.AsyncClient) -> None:
    many = await fake_client.post("/v1/classify", json={"input": ["spam?"] * 100_000})
    assert many.status_code == 413
    assert error_of(many)["message"] == "100000 inputs is over the limit of 128 per request"
    long = await fake_client.post("/v1/moderations", json={"input": ["ok", "x" * 250_001]})
    assert long.status_code == 413 and error_of(long)["code"] == "input_too_long"
    assert "input[1] has 250001 characters" in error_of(long)["message"]
    await still_serving(fake_client)


async def test_moderation_input_errors(fake_client: httpx.AsyncClient) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    for body, fragment in [
        ({"input": [image]}, "only text parts"),
        ({"input": [{"type": "text"}]}, "text: field required"),
        ({"input": "x", "model": 3}, "model"),
        ({"input": "x", "extra": True}, "unknown field"),
    ]:
        response = await fake_client.post("/v1/moderations", json=body)
        assert response.status_code == 422, response.text
        assert fragment in error_of(response)["message"]


async def test_unknown_routes_and_methods(fake_client: httpx.AsyncClient) -> None:
    missing = await fake_client.get("/v2/classify")
    assert missing.status_code == 404 and error_of(missing)["code"] == "not_found"
    wrong = await fake_client.get("/v1/classify")
    assert wrong.status_code == 405 and error_of(wrong)["code"] == "method_not_allowed"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=st.dictionaries(
        st.sampled_from(["input", "long_document", "aggregation", "x"]), json_values
    )
)
async def test_no_json_value_causes_a_server_error(
    fake_client: httpx.AsyncClient, body: dict
) -> None:
    response = await fake_client.post("/v1/classify", content=json.dumps(body), headers=JSON)
    assert response.status_code in (200, 400, 413, 422), response.text
    if response.status_code != 200:
        error_of(response)
