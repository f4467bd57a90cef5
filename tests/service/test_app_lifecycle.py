"""The app's lifespan and edges: background services, client disconnects, shutdown, crashes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from service_testing import ControlledEngine, make_settings, serving, until, wait_ready

from service.app import create_app
from service.artifact import ArtifactConfig
from service.batcher import Priority
from service.classifier import Classification
from service.state import ServiceState, get_state


class RecordingService:
    """Stands in for a batch-jobs worker: classifies at batch priority while the app runs."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.result: Classification | None = None

    async def start(self, state: ServiceState) -> None:
        assert state.classifier is not None and state.batcher is not None
        self.events.append("start")
        self.result = await state.classifier.classify(
            ["a job line"], long_document="chunk", priority=Priority.BATCH, wait_for_room=True
        )

    async def stop(self) -> None:
        self.events.append("stop")


async def test_background_services_start_after_the_classifier_and_stop_first(
    fake_artifact: Path, engine: ControlledEngine
) -> None:
    service = RecordingService()
    app = create_app(make_settings(fake_artifact), engine=engine, services=[service])
    async with serving(app) as client:
        assert (await client.post("/v1/classify", json={"input": "hi"})).status_code == 200
        assert service.events == ["start"]
    assert service.events == ["start", "stop"]
    assert service.result is not None and service.result.results[0].chunks == 1
    text = get_state(app).metrics.render().decode()
    assert 'linmod_queue_wait_seconds_count{priority="batch"} 1.0' in text


async def test_a_client_that_disconnects_leaves_the_queue(
    fake_artifact: Path, engine: ControlledEngine
) -> None:
    app = create_app(make_settings(fake_artifact, warmup=False), engine=engine)
    async with serving(app):
        engine.gate.clear()
        body = json.dumps({"input": "never answered"}).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        gone = asyncio.Event()

        async def receive() -> dict[str, object]:
            if messages:
                return messages.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        sent: list[dict[str, object]] = []

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/v1/classify", "raw_path": b"/v1/classify",
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
            "server": ("linmod", 80), "headers": [(b"content-type", b"application/json")],
        }  # fmt: skip
        call = asyncio.create_task(app(scope, receive, send))
        assert await asyncio.to_thread(engine.entered.acquire, timeout=5)
        gone.set()  # the client hangs up while its window is in the engine
        await asyncio.wait_for(call, timeout=5)
        engine.gate.set()
        assert sent[0]["status"] == 499
        rejections = get_state(app).metrics.rejections.labels("cancelled")._value.get()
        assert rejections == 1


async def test_shutdown_answers_what_is_in_flight(
    fake_artifact: Path, engine: ControlledEngine
) -> None:
    app = create_app(make_settings(fake_artifact, warmup=False), engine=engine)
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://linmod") as client:
        # Readiness comes from the warm-up task: before it, requests are 503s, not in flight.
        await wait_ready(client)
        engine.gate.clear()
        in_flight = [
            asyncio.create_task(client.post("/v1/classify", json={"input": f"text {i}"}))
            for i in range(3)
        ]
        assert await asyncio.to_thread(engine.entered.acquire, timeout=5)
        batcher, registry = get_state(app).batcher, get_state(app).metrics.registry
        assert batcher is not None

        def admitted() -> float:
            labels = {"priority": "interactive"}
            taken = registry.get_sample_value("linmod_queue_wait_seconds_count", labels) or 0
            return taken + batcher.queued(Priority.INTERACTIVE)[0]

        await until(lambda: admitted() == 3)
        closing = asyncio.create_task(lifespan.__aexit__(None, None, None))
        await asyncio.sleep(0.01)
        late = await client.post("/v1/classify", json={"input": "too late"})
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        assert (await client.get("/ready")).status_code == 503
        engine.gate.set()
        responses = await asyncio.gather(*in_flight)
        await closing
    assert [r.status_code for r in responses] == [200, 200, 200]


async def test_an_unexpected_error_is_a_json_500_without_traceback(
    fake_artifact: Path, model_config: ArtifactConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(make_settings(fake_artifact), engine=ControlledEngine(model_config))
    async with serving(app) as client:
        classifier = get_state(app).classifier

        async def broken(*args: object, **kwargs: object) -> Classification:
            raise KeyError("a bug")

        monkeypatch.setattr(classifier, "classify", broken)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://linmod") as raw:
            response = await raw.post("/v1/classify", json={"input": "hi"})
        assert response.status_code == 500
        assert response.json() == {
            "error": {"message": "internal server error", "type": "server_error",
                      "code": "internal_error"}
        }  # fmt: skip
        assert response.headers["x-request-id"]
        monkeypatch.undo()
        assert (await client.post("/v1/classify", json={"input": "hi"})).status_code == 200
