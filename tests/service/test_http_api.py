"""The HTTP API over the fake engine, in process: shapes, policies, headers, auth and overload."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import httpx2
from openai import AsyncOpenAI
from service_testing import ControlledEngine, make_settings, serving, until, wait_ready

from service.app import create_app
from service.artifact import ArtifactConfig
from service.batcher import Priority
from service.engine import FakeEngine
from service.state import get_state

LONG_TEXT = "Win a free prize now, click here to claim your reward! " * 30  # ~400 tokens


async def test_single_text(fake_client: httpx.AsyncClient) -> None:
    response = await fake_client.post("/v1/classify", json={"input": "Lunch at noon?"})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "fake-linformer" and body["object"] == "classification"
    (result,) = body["results"]
    assert set(result) == {"label", "score", "scores", "flagged", "tokens", "chunks", "truncated"}
    assert result["label"] in ("ham", "spam")
    assert result["score"] == max(result["scores"].values())
    assert abs(sum(result["scores"].values()) - 1) < 1e-5
    assert result["flagged"] == (result["scores"]["spam"] >= 0.5)
    assert result["chunks"] == 1 and not result["truncated"] and result["tokens"] > 0
    assert len(response.headers["x-request-id"]) == 32
    for header in ("x-tokenization-time-ms", "x-queue-time-ms", "x-inference-time-ms"):
        assert 0 <= float(response.headers[header]) <= float(response.headers["x-total-time-ms"])


async def test_list_keeps_order_and_matches_single(fake_client: httpx.AsyncClient) -> None:
    texts = ["Lunch at noon?", "URGENT: verify your password", "Meeting moved to Thursday"]
    listed = (await fake_client.post("/v1/classify", json={"input": texts})).json()["results"]
    for text, result in zip(texts, listed, strict=True):
        alone = (await fake_client.post("/v1/classify", json={"input": text})).json()["results"]
        assert alone[0] == result


async def test_long_document_policies(fake_client: httpx.AsyncClient) -> None:
    async def classify(**extra: str) -> httpx.Response:
        return await fake_client.post("/v1/classify", json={"input": LONG_TEXT, **extra})

    chunked = (await classify()).json()["results"][0]
    assert chunked["tokens"] > 64 and chunked["chunks"] > 1 and not chunked["truncated"]
    # n_max=64 and the default overlap n_max // 4 = 16: stride 48, last window aligned to the end.
    assert chunked["chunks"] == -(-(chunked["tokens"] - 16) // 48)

    truncated = (await classify(long_document="truncate")).json()["results"][0]
    assert truncated["truncated"] and truncated["chunks"] == 1
    assert truncated["tokens"] == chunked["tokens"]

    mean = (await classify(aggregation="mean")).json()["results"][0]
    assert mean["chunks"] == chunked["chunks"]

    rejected = await classify(long_document="reject")
    assert rejected.status_code == 413
    error = rejected.json()["error"]
    assert error["code"] == "document_too_long" and "64" in error["message"]

    short = await fake_client.post("/v1/classify", json={"input": "hi", "long_document": "reject"})
    assert short.status_code == 200


async def test_chunk_max_picks_the_most_flagged_window(fake_client: httpx.AsyncClient) -> None:
    chunked = (await fake_client.post("/v1/classify", json={"input": LONG_TEXT})).json()
    mean = (
        await fake_client.post("/v1/classify", json={"input": LONG_TEXT, "aggregation": "mean"})
    ).json()
    assert chunked["results"][0]["scores"]["spam"] >= mean["results"][0]["scores"]["spam"] - 1e-6


async def test_moderations_through_the_openai_client(
    fake_artifact: Path, model_config: ArtifactConfig
) -> None:
    app = create_app(make_settings(fake_artifact), engine=FakeEngine(model_config))
    async with serving(app):
        http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://linmod")
        client = AsyncOpenAI(api_key="unused", base_url="http://linmod/v1", http_client=http)
        one = await client.moderations.create(model="omni-moderation-latest", input="hello there")
        many = await client.moderations.create(input=["hello", LONG_TEXT])
        await http.aclose()
    assert one.model == "fake-linformer" and one.id.startswith("modr-")
    (result,) = one.results
    # The model's flag labels arrive as the categories; OpenAI's own names stay unset (None).
    assert result.to_dict()["category_scores"] == {"spam": result.category_scores.spam}
    assert result.categories.spam == (result.category_scores.spam >= 0.5)
    assert result.category_scores.hate is None
    assert result.flagged == result.categories.spam
    assert len(many.results) == 2


async def test_moderation_scores_agree_with_classify(fake_client: httpx.AsyncClient) -> None:
    text = "Cheap meds, no prescription"
    parts = [{"type": "text", "text": text}]
    moderated = (await fake_client.post("/v1/moderations", json={"input": parts})).json()
    classified = (await fake_client.post("/v1/classify", json={"input": text})).json()
    assert (
        moderated["results"][0]["category_scores"]["spam"]
        == classified["results"][0]["scores"]["spam"]
    )
    assert moderated["results"][0]["category_applied_input_types"] == {"spam": ["text"]}


async def test_operations_endpoints(fake_client: httpx.AsyncClient) -> None:
    assert (await fake_client.get("/health")).json() == {"status": "ok"}
    assert (await fake_client.get("/ready")).json() == {"status": "ready"}
    info = (await fake_client.get("/info")).json()
    assert info["model"]["labels"] == ["ham", "spam"] and info["model"]["n_max"] == 64
    assert info["model"]["k"] == 16 and info["model"]["sharing"] == "layerwise"
    assert info["runtime"]["provider"] == "fake" and info["runtime"]["precision"] == "fp32"
    assert info["batching"]["max_batch_tokens"] == 16384
    assert info["batching"]["max_wait_s"] == 0.001
    assert info["long_document"] == {"policy": "chunk", "chunk_overlap": 16, "aggregation": "max"}
    assert "linmod" in info["runtime"]["versions"]
    assert (await fake_client.get("/docs")).status_code == 200
    paths = (await fake_client.get("/openapi.json")).json()["paths"]
    assert {"/v1/classify", "/v1/moderations", "/health", "/ready", "/info", "/metrics"} <= set(
        paths
    )


async def test_a_client_request_id_is_echoed(fake_client: httpx.AsyncClient) -> None:
    response = await fake_client.post(
        "/v1/classify", json={"input": "hi"}, headers={"x-request-id": "trace-42"}
    )
    assert response.headers["x-request-id"] == "trace-42"
    assert response.json()["id"] == "cls-trace-42"
    odd = await fake_client.get("/health", headers={"x-request-id": "no spaces allowed"})
    assert odd.headers["x-request-id"] != "no spaces allowed"


async def test_api_keys(fake_artifact: Path, model_config: ArtifactConfig) -> None:
    settings = make_settings(fake_artifact, api_keys="k1, k2")
    async with serving(create_app(settings, engine=FakeEngine(model_config))) as client:
        body = {"input": "hi"}
        missing = await client.post("/v1/classify", json=body)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["type"] == "authentication_error"
        wrong = await client.post("/v1/classify", json=body, headers={"authorization": "Bearer k3"})
        assert wrong.status_code == 401
        for key in ("k1", "k2"):
            ok = await client.post(
                "/v1/moderations", json=body, headers={"authorization": f"Bearer {key}"}
            )
            assert ok.status_code == 200
        for open_path in ("/health", "/ready", "/metrics"):
            assert (await client.get(open_path)).status_code == 200


async def test_not_ready_until_warm(fake_artifact: Path, model_config: ArtifactConfig) -> None:
    engine = ControlledEngine(model_config)
    engine.gate.clear()  # warm-up blocks until the gate opens
    app = create_app(make_settings(fake_artifact), engine=engine)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        assert (await c.get("/health")).status_code == 200
        ready = await c.get("/ready")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
        early = await c.post("/v1/classify", json={"input": "hi"})
        assert early.status_code == 503 and early.headers["retry-after"] == "1"
        engine.gate.set()
        await wait_ready(c)
        assert (await c.post("/v1/classify", json={"input": "hi"})).status_code == 200


async def test_a_full_queue_is_429_for_one_text_or_a_list(
    fake_artifact: Path, engine: ControlledEngine
) -> None:
    settings = make_settings(fake_artifact, warmup=False, max_batch_size=1, max_queue_items=1)
    app = create_app(settings, engine=engine)
    async with serving(app) as client:
        batcher = get_state(app).batcher
        assert batcher is not None
        engine.gate.clear()
        admitted = [asyncio.create_task(client.post("/v1/classify", json={"input": "first"}))]
        assert await asyncio.to_thread(engine.entered.acquire, timeout=5)
        registry = get_state(app).metrics.registry
        labels = {"priority": "interactive"}

        def taken() -> float | None:
            return registry.get_sample_value("linmod_queue_wait_seconds_count", labels)

        # "second" is formed into the batch waiting behind the running one...
        admitted.append(asyncio.create_task(client.post("/v1/classify", json={"input": "second"})))
        await until(lambda: taken() == 2)
        # ...and "third" fills the queue.
        admitted.append(asyncio.create_task(client.post("/v1/classify", json={"input": "third"})))
        await until(lambda: batcher.queued(Priority.INTERACTIVE)[0] == 1)
        for body in ({"input": "x"}, {"input": ["x", "y"]}):
            full = await client.post("/v1/classify", json=body)
            assert full.status_code == 429, full.text
            assert int(full.headers["retry-after"]) >= 1
            assert full.json()["error"]["type"] == "rate_limit_error"
        engine.gate.set()
        assert [r.status_code for r in await asyncio.gather(*admitted)] == [200, 200, 200]


async def test_deadline_is_504_and_engine_failure_is_500(
    fake_artifact: Path, engine: ControlledEngine
) -> None:
    # A short deadline only for the request held in the engine: it must run out. The rest runs
    # under the default deadline so a slow machine cannot turn them into 504s too.
    short = make_settings(fake_artifact, warmup=False, request_timeout_s=0.05)
    async with serving(create_app(short, engine=engine)) as client:
        engine.gate.clear()
        late = await client.post("/v1/classify", json={"input": "held in the engine"})
        assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"
        engine.gate.set()
    settings = make_settings(fake_artifact, warmup=False)
    async with serving(create_app(settings, engine=engine)) as client:
        engine.fail_if = lambda ids: True
        failed = await client.post("/v1/classify", json={"input": "boom"})
        assert failed.status_code == 500
        assert failed.json()["error"] == {
            "message": "inference failed: boom", "type": "server_error", "code": "inference_failed"
        }  # fmt: skip
        engine.fail_if = None
        assert (await client.post("/v1/classify", json={"input": "fine"})).status_code == 200
