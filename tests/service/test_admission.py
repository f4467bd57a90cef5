"""Admission before tokenizing: a request over the budget is a 413, one that does not fit now a
429 with Retry-After, large bodies share a budget before parsing, and the deadline covers
tokenizing. A tokenizer held at a gate makes "busy" deterministic.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_testing import make_settings, serving, until

from service.app import create_app
from service.artifact import ArtifactConfig
from service.engine import FakeEngine
from service.state import get_state

JSON = {"content-type": "application/json"}


@pytest.fixture
async def gated(
    fake_artifact: Path, model_config: ArtifactConfig, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[httpx.AsyncClient, threading.Event, list[int]]]:
    """A client, a gate the tokenizer waits at (open), and the sizes it was called with."""
    overrides: dict[str, Any] = getattr(request, "param", {})
    # Every text goes through the tokenizer threads here, however short (the gate under test).
    defaults = {"max_tokenize_chars": 1000, "inline_tokenize_chars": 0}
    settings = make_settings(fake_artifact, **(defaults | overrides))
    app = create_app(settings, engine=FakeEngine(model_config))
    gate, calls = threading.Event(), []
    gate.set()
    async with serving(app) as client:
        classifier = get_state(app).classifier
        assert classifier is not None
        encode = classifier._encoder.encode

        def held(texts: Sequence[str]) -> Any:
            calls.append(sum(map(len, texts)))
            gate.wait(10)
            return encode(texts)

        classifier._encoder.encode = held  # type: ignore[method-assign]
        yield client, gate, calls
        gate.set()


async def test_over_the_budget_is_a_413(gated: Any) -> None:
    client, _, calls = gated
    response = await client.post("/v1/classify", json={"input": ["x" * 600, "y" * 600]})
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large"
    assert calls == []  # refused before any tokenizing


async def test_no_room_now_is_a_429_with_retry_after(gated: Any) -> None:
    client, gate, calls = gated
    gate.clear()
    first = asyncio.create_task(client.post("/v1/classify", json={"input": "a" * 700}))
    await until(lambda: len(calls) == 1)
    refused = await client.post("/v1/classify", json={"input": "b" * 400})
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "queue_full"
    fits = asyncio.create_task(client.post("/v1/moderations", json={"input": "c" * 200}))
    await until(lambda: len(calls) == 2)
    gate.set()
    assert (await first).status_code == 200 and (await fits).status_code == 200
    assert (await client.post("/v1/classify", json={"input": "b" * 400})).status_code == 200


@pytest.mark.parametrize("gated", [{"request_timeout_s": 0.3}], indirect=True)
async def test_the_deadline_covers_tokenizing(gated: Any) -> None:
    client, gate, calls = gated
    gate.clear()
    response = await client.post("/v1/classify", json={"input": "slow to tokenize"})
    assert response.status_code == 504, response.text
    assert "tokenized" in response.json()["error"]["message"]
    gate.set()
    await until(lambda: len(calls) == 1)
    # The budget comes back when the thread finishes, although the caller has gone.
    assert (await client.post("/v1/classify", json={"input": "a" * 900})).status_code == 200


@pytest.mark.parametrize(
    "gated",
    [
        {
            "max_inflight_body_bytes": 200_000,
            "max_tokenize_chars": 10**7,
            "large_body_refusal_delay_ms": 300,
        }
    ],
    indirect=True,
)
async def test_large_bodies_share_a_budget_before_parsing(gated: Any) -> None:
    client, gate, calls = gated
    gate.clear()
    big = json.dumps({"input": "z" * 150_000})
    first = asyncio.create_task(client.post("/v1/classify", content=big, headers=JSON))
    await until(lambda: len(calls) == 1)
    loop = asyncio.get_running_loop()
    sent = loop.time()
    refused = await client.post("/v1/classify", content=big, headers=JSON)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1", refused.text
    # The refusal is held back for the configured delay (a client retrying at once cycles
    # slower); the request it refused was never read.
    assert loop.time() - sent >= 0.3
    # The body was never read: the connection closes rather than draining megabytes of it.
    assert refused.headers["connection"] == "close"
    small = asyncio.create_task(client.post("/v1/classify", json={"input": "small"}))
    await until(lambda: len(calls) == 2)  # small bodies are not held back by it
    gate.set()
    assert (await first).status_code == 200 and (await small).status_code == 200
    assert (await client.post("/v1/classify", content=big, headers=JSON)).status_code == 200


@pytest.mark.parametrize(
    "gated",
    [
        {
            "max_inflight_body_bytes": 200_000,
            "max_tokenize_chars": 100_000,
            "large_body_refusal_delay_ms": 300,
            "max_body_bytes": 400_000,
        }
    ],
    indirect=True,
)
async def test_a_large_body_read_then_refused_waits_holding_its_share(gated: Any) -> None:
    """A client resending a body that is read, parsed and refused as too large would keep the
    host parsing back to back; its 413 waits like a 429 and keeps its share of the budget."""
    client, _, calls = gated
    loop = asyncio.get_running_loop()
    too_many_chars = json.dumps({"input": "z" * 150_000})
    sent = loop.time()
    refused = asyncio.create_task(client.post("/v1/classify", content=too_many_chars, headers=JSON))
    await asyncio.sleep(0.1)
    # Meanwhile small bodies are served at once ...
    small = await client.post("/v1/classify", json={"input": "small"})
    assert small.status_code == 200 and not refused.done()
    # ... and another large body finds no room: the refused one still holds its share.
    other = json.dumps({"input": "y" * 90_000})
    busy = await client.post("/v1/classify", content=other, headers=JSON)
    assert busy.status_code == 429, busy.text
    answer = await refused
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"
    assert loop.time() - sent >= 0.3
    assert calls == [len("small")]  # the refused body was never tokenized
    # A body refused on its declared length alone was not read: its 413 goes out at once.
    sent = loop.time()
    declared = await client.post("/v1/classify", content=b"x" * 500_000, headers=JSON)
    assert declared.status_code == 413 and loop.time() - sent < 0.3, declared.text
    # The share came back: a large body that fits is served.
    fits = await client.post("/v1/classify", content=other, headers=JSON)
    assert fits.status_code == 200, fits.text


async def test_twenty_concurrent_4mb_requests_are_refused_not_timed_out(
    fake_artifact: Path, model_config: ArtifactConfig
) -> None:
    """With the default limits, 4 MB bodies get 413 or 429 while a small client is served."""
    app = create_app(make_settings(fake_artifact), engine=FakeEngine(model_config))
    body = json.dumps({"input": ["w" * 249_000] * 16}).encode()
    assert 3_900_000 < len(body) < 4 * 1024 * 1024
    async with serving(app) as client:
        large = [client.post("/v1/classify", content=body, headers=JSON) for _ in range(20)]
        small = [client.post("/v1/classify", json={"input": f"hi {i}"}) for i in range(20)]
        responses = await asyncio.gather(*large, *small)
    assert {r.status_code for r in responses[:20]} <= {413, 429}, responses[0].text
    assert [r.status_code for r in responses[20:]] == [200] * 20
