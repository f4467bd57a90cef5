"""/metrics: parses as Prometheus text, has every series at start-up, and moves with traffic."""

from __future__ import annotations

import asyncio

import httpx
from prometheus_client.parser import text_string_to_metric_families

FAMILIES = {
    "linmod_http_requests": "counter",
    "linmod_http_request_duration_seconds": "histogram",
    "linmod_queue_wait_seconds": "histogram",
    "linmod_tokenize_duration_seconds": "histogram",
    "linmod_inference_duration_seconds": "histogram",
    "linmod_batch_size": "histogram",
    "linmod_batch_tokens": "histogram",
    "linmod_batch_padding_ratio": "histogram",
    "linmod_documents": "counter",
    "linmod_tokens": "counter",
    "linmod_padded_tokens": "counter",
    "linmod_chunks": "counter",
    "linmod_queue_items": "gauge",
    "linmod_queue_tokens": "gauge",
    "linmod_rejections": "counter",
    "linmod_model_info": "gauge",
    "linmod_batch_jobs": "gauge",
    "linmod_batch_job_lines": "counter",
}


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def get(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_every_family_exists_at_start(fake_client: httpx.AsyncClient) -> None:
    response = await fake_client.get("/metrics")
    families = {f.name: f.type for f in text_string_to_metric_families(response.text)}
    for name, kind in FAMILIES.items():
        assert families.get(name) == kind, name
    samples = await scrape(fake_client)
    for reason in ("queue_full", "deadline", "too_large", "invalid", "unauthorized", "cancelled"):
        assert ("linmod_rejections_total", frozenset({("reason", reason)})) in samples, reason
    for priority in ("interactive", "batch"):
        assert get(samples, "linmod_queue_items", priority=priority) == 0
        assert ("linmod_queue_wait_seconds_count", frozenset({("priority", priority)})) in samples
    assert get(samples, "linmod_batch_jobs", status="in_progress") == 0
    assert ("linmod_batch_job_lines_total", frozenset({("outcome", "failed")})) in samples
    assert get(samples, "linmod_documents_total") == 0
    assert (
        get(
            samples, "linmod_http_requests_total", route="/v1/classify", method="POST", status="200"
        )
        == 0
    )
    info = [k for k in samples if k[0] == "linmod_model_info"]
    assert dict(info[0][1]) == {
        "model": "fake-linformer", "version": "0.0.1", "provider": "fake", "precision": "fp32"
    }  # fmt: skip


async def test_counters_and_histograms_move_with_traffic(fake_client: httpx.AsyncClient) -> None:
    before = await scrape(fake_client)
    long_text = "Cheap meds, no prescription, limited offer, act now. " * 30
    one = await fake_client.post("/v1/classify", json={"input": "hello"})
    two = await fake_client.post("/v1/classify", json={"input": ["hello again", long_text]})
    results = one.json()["results"] + two.json()["results"]
    assert (await fake_client.post("/v1/classify", json={"input": ""})).status_code == 422
    assert (await fake_client.post("/v1/classify", json={"input": ["x"] * 129})).status_code == 413
    # A run's metrics are recorded just after its answers, in the same turn of the loop; over
    # this in-process transport the scrape could come first without this turn.
    await asyncio.sleep(0)
    after = await scrape(fake_client)

    def delta(name: str, **labels: str) -> float:
        return get(after, name, **labels) - get(before, name, **labels)

    chunks = sum(r["chunks"] for r in results)
    assert (
        delta("linmod_http_requests_total", route="/v1/classify", method="POST", status="200") == 2
    )
    assert (
        delta("linmod_http_requests_total", route="/v1/classify", method="POST", status="422") == 1
    )
    assert (
        delta("linmod_http_request_duration_seconds_count", route="/v1/classify", method="POST")
        == 4
    )
    assert delta("linmod_documents_total") == 3
    assert delta("linmod_chunks_total") == chunks > 3
    assert delta("linmod_tokenize_duration_seconds_count") == 2
    assert delta("linmod_queue_wait_seconds_count", priority="interactive") == chunks
    assert delta("linmod_batch_size_sum") == chunks
    runs = delta("linmod_batch_size_count")
    assert runs >= 2
    assert delta("linmod_inference_duration_seconds_count") == runs
    assert delta("linmod_batch_padding_ratio_count") == runs
    assert delta("linmod_batch_tokens_sum") == delta("linmod_padded_tokens_total")
    # Real tokens run: each window once, so overlapping windows count their shared tokens twice.
    assert delta("linmod_tokens_total") >= sum(r["tokens"] for r in results)
    assert delta("linmod_padded_tokens_total") >= delta("linmod_tokens_total")
    assert delta("linmod_rejections_total", reason="invalid") == 1
    assert delta("linmod_rejections_total", reason="too_large") == 1
    assert get(after, "linmod_queue_items", priority="interactive") == 0
