"""End to end through HTTP with the tiny real exported Linformer (`tiny_artifact`, n_max small).

In process with the lifespan running (httpx ASGI transport); see test_e2e_server.py for the
same over a real uvicorn process.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import httpx2
import numpy as np
import pytest
from openai import AsyncOpenAI
from service_testing import make_settings, serving
from tokenizers import Tokenizer

from service.app import create_app
from service.artifact import ArtifactConfig, softmax
from service.documents import window_starts
from service.engine import OnnxEngine

# The fixture trains and exports a model: slow by the marker's definition, even in process.
pytestmark = pytest.mark.slow

WORDS = [
    "win", "free", "prize", "click", "claim", "reward", "meeting", "thursday", "agenda", "cheap",
    "meds", "offer", "act", "now", "review", "patch", "release", "monday", "urgent", "account",
    "verify", "password", "lunch", "noon", "station",
]  # fmt: skip


def text_of(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture
async def fp32_client(tiny_artifact: Path) -> AsyncIterator[httpx.AsyncClient]:
    # max_wait 20 ms lets a concurrent burst share batches, so invariance is really tested.
    settings = make_settings(tiny_artifact, device="cpu", precision="fp32", max_wait_ms=20.0)
    async with serving(create_app(settings)) as client:
        yield client


@pytest.fixture(scope="module")
def reference(tiny_artifact: Path) -> tuple[OnnxEngine, Tokenizer, ArtifactConfig]:
    """The same model driven by hand: each window alone, no padding, no batching."""
    engine = OnnxEngine.load(tiny_artifact, device="cpu", precision="fp32")
    tokenizer = Tokenizer.from_file(str(tiny_artifact / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return engine, tokenizer, engine.config


def alone(engine: OnnxEngine, ids: list[int]) -> np.ndarray:
    window = np.asarray(ids, dtype=np.int64)[None, :]
    return softmax(engine.run(window, np.ones_like(window)))[0]


async def classify(client: httpx.AsyncClient, body: dict[str, object]) -> list[dict[str, object]]:
    response = await client.post("/v1/classify", json=body)
    assert response.status_code == 200, response.text
    results: list[dict[str, object]] = response.json()["results"]
    return results


def scores(result: dict[str, object]) -> np.ndarray:
    values = result["scores"]
    assert isinstance(values, dict)
    return np.array(list(values.values()))


async def test_info_reports_the_real_runtime(fp32_client: httpx.AsyncClient) -> None:
    info = (await fp32_client.get("/info")).json()
    assert info["runtime"]["provider"] == "CPUExecutionProvider"
    assert info["runtime"]["precision"] == "fp32"
    assert info["model"]["n_max"] >= 8 and len(info["model"]["labels"]) >= 2
    metrics = (await fp32_client.get("/metrics")).text
    assert 'provider="CPUExecutionProvider"' in metrics and 'precision="fp32"' in metrics
    # Warm-up timed the real session over batch shapes and chose a policy from them.
    batching = info["batching"]
    grid = batching["cost_model"]["grid_ms"]
    assert grid[0]["batch"] == 1 and grid[-1]["length"] == info["model"]["n_max"]
    assert any(p["batch"] > 1 for p in grid) and all(p["ms"] > 0 for p in grid)
    assert batching["policy"]["batching"] in (True, False) and batching["policy"]["reason"]
    assert batching["engine_workers"] >= 1 and batching["batching"] == "auto"
    enabled = "1.0" if batching["policy"]["batching"] else "0.0"
    assert f'linmod_batching_enabled{{model="{info["model"]["served_name"]}"}} {enabled}' in metrics
    assert "linmod_engine_cost_seconds{" in metrics and "linmod_engine_cost_scale{" in metrics


async def test_single_and_list_match_the_model_run_by_hand(
    fp32_client: httpx.AsyncClient, reference: tuple[OnnxEngine, Tokenizer, ArtifactConfig]
) -> None:
    engine, tokenizer, config = reference
    texts = ["win a free prize now", "meeting moved to thursday", "lunch at noon?"]
    (single,) = await classify(fp32_client, {"input": texts[0]})
    listed = await classify(fp32_client, {"input": texts})
    np.testing.assert_allclose(scores(single), scores(listed[0]), atol=1e-5)
    for text, result in zip(texts, listed, strict=True):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        expected = alone(engine, ids)
        np.testing.assert_allclose(scores(result), expected, atol=1e-5)
        assert result["tokens"] == len(ids) and result["chunks"] == 1
        assert result["label"] == config.labels[int(expected.argmax())]
        flag = max(expected[config.labels.index(lab)] for lab in config.flag_labels)
        assert result["flagged"] == bool(flag >= config.threshold)


async def test_long_documents_chunk_truncate_reject(
    fp32_client: httpx.AsyncClient, reference: tuple[OnnxEngine, Tokenizer, ArtifactConfig]
) -> None:
    engine, tokenizer, config = reference
    n_max = config.n_max
    text = text_of(6 * n_max, seed=1)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) > 3 * n_max

    (chunked,) = await classify(fp32_client, {"input": text})
    overlap = min(256, n_max // 4)
    starts = window_starts(len(ids), n_max, overlap)
    assert chunked["chunks"] == len(starts) and chunked["tokens"] == len(ids)
    windows = np.stack([alone(engine, ids[s : s + n_max]) for s in starts])
    flags = [config.labels.index(label) for label in config.flag_labels]
    expected_max = windows[int(windows[:, flags].max(axis=1).argmax())]
    np.testing.assert_allclose(scores(chunked), expected_max, atol=1e-5)

    (mean,) = await classify(fp32_client, {"input": text, "aggregation": "mean"})
    np.testing.assert_allclose(scores(mean), windows.mean(axis=0), atol=1e-5)

    (truncated,) = await classify(fp32_client, {"input": text, "long_document": "truncate"})
    assert truncated["truncated"] and truncated["chunks"] == 1
    np.testing.assert_allclose(scores(truncated), alone(engine, ids[:n_max]), atol=1e-5)

    rejected = await fp32_client.post(
        "/v1/classify", json={"input": text, "long_document": "reject"}
    )
    assert rejected.status_code == 413
    assert f"{len(ids)} tokens" in rejected.json()["error"]["message"]


async def test_results_do_not_depend_on_the_batch(fp32_client: httpx.AsyncClient) -> None:
    texts = [text_of(n, seed=n) for n in (1, 3, 9, 20, 40, 70, 150, 400)]
    solo = [(await classify(fp32_client, {"input": t}))[0] for t in texts]
    before = (await fp32_client.get("/metrics")).text

    bodies = [{"input": t} for t in texts] + [{"input": texts[::-1]}, {"input": texts[2:6]}]
    burst = await asyncio.gather(*(classify(fp32_client, b) for b in bodies))
    for i, text in enumerate(texts):
        for got in (burst[i][0], burst[-2][len(texts) - 1 - i]):
            assert got["label"] == solo[i]["label"] and got["flagged"] == solo[i]["flagged"], text
            np.testing.assert_allclose(scores(got), scores(solo[i]), atol=1e-5)
    # The burst really was batched together (otherwise this test would prove nothing).
    after = (await fp32_client.get("/metrics")).text
    runs = _sample(after, "linmod_batch_size_count") - _sample(before, "linmod_batch_size_count")
    windows = _sample(after, "linmod_batch_size_sum") - _sample(before, "linmod_batch_size_sum")
    assert windows > runs


async def test_moderations_create_through_the_openai_client(tiny_artifact: Path) -> None:
    app = create_app(make_settings(tiny_artifact, device="cpu", precision="fp32"))
    async with serving(app) as client:
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://linmod") as http:
            openai = AsyncOpenAI(api_key="none", base_url="http://linmod/v1", http_client=http)
            moderation = await openai.moderations.create(
                model="omni-moderation-latest", input=["hello", text_of(500, seed=2)]
            )
        classified = await classify(client, {"input": ["hello", text_of(500, seed=2)]})
    config = ArtifactConfig.from_dir(tiny_artifact)
    assert moderation.model == config.name and len(moderation.results) == 2
    for result, expected in zip(moderation.results, classified, strict=True):
        assert result.flagged == expected["flagged"]
        for label in config.flag_labels:
            assert result.to_dict()["category_scores"][label] == expected["scores"][label]  # type: ignore[index]


async def test_int8_on_cpu_is_batch_invariant(tiny_artifact: Path) -> None:
    # The int8 file is statically quantized (activation scales fixed at export), so each row is
    # quantized alone and a document's scores do not move with its batch company.
    settings = make_settings(tiny_artifact, device="cpu", max_wait_ms=20.0)
    texts = [text_of(n, seed=n) for n in (2, 10, 60, 300)]
    async with serving(create_app(settings)) as client:
        info = (await client.get("/info")).json()
        assert info["runtime"]["precision"] == "int8"
        solo = [(await classify(client, {"input": t}))[0] for t in texts]
        burst = await asyncio.gather(*(classify(client, {"input": t}) for t in texts))
    for one, many in zip(solo, burst, strict=True):
        np.testing.assert_allclose(scores(many[0]), scores(one), atol=1e-5)


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")
