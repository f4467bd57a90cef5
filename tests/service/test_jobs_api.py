"""Batch jobs over HTTP, in process with the fake engine: files, batches, output lines equal to the
endpoints' answers, the OpenAI client, cancelling, expiry, retention, keys, shutdown, the CLI.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from jobs_testing import TEXTS, jsonl, parse_lines, request_line, upload, wait_for
from openai import AsyncOpenAI
from service_testing import ControlledEngine, make_settings, serving, until
from sqlalchemy import create_engine, text

from service.app import create_app
from service.artifact import ArtifactConfig
from service.batcher import Priority
from service.documents import DocumentEncoder
from service.engine import FakeEngine
from service.jobs.client import run_batch
from service.state import get_state

FAST = {"job_poll_s": 0.01, "job_lease_s": 5.0, "job_claim_lines": 8}
LONG_TEXT = "Win a free prize now, click here to claim your reward! " * 30  # ~400 tokens


@pytest.fixture
def jobs_client(fake_artifact: Path, model_config: ArtifactConfig) -> Callable[..., Any]:
    """Make an app serving batch jobs (fake engine unless given) and yield a client of it."""

    @asynccontextmanager
    async def make(engine: Any = None, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
        settings = make_settings(fake_artifact, **(FAST | overrides))
        app = create_app(settings, engine=engine or FakeEngine(model_config))
        async with serving(app) as client:
            yield client

    return make


def without_ids(body: Any) -> Any:
    """A response body without the request id it carries."""
    if isinstance(body, dict):
        return {k: without_ids(v) for k, v in body.items() if k != "id"}
    return body


async def run(
    client: httpx.AsyncClient, content: bytes, endpoint: str, **kw: Any
) -> dict[str, Any]:
    uploaded = await upload(client, content, **kw)
    assert uploaded.status_code == 200, uploaded.text
    body = {
        "input_file_id": uploaded.json()["id"],
        "endpoint": endpoint,
        "completion_window": "24h",
    }
    created = await client.post("/v1/batches", json=body, **kw)
    assert created.status_code == 200, created.text
    return await wait_for(client, created.json()["id"], **kw)


async def content(
    client: httpx.AsyncClient, file_id: str | None, **kw: Any
) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    response = await client.get(f"/v1/files/{file_id}/content", **kw)
    assert response.status_code == 200, response.text
    return parse_lines(response.content)


def error_of(response: httpx.Response) -> dict[str, str]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code"}, body
    return body["error"]


async def test_a_batch_runs_end_to_end(jobs_client: Callable[..., Any]) -> None:
    lines: list[Any] = [request_line(f"m{i}", TEXTS[i % 4]) for i in range(40)]
    lines += ["{broken", request_line("c1", "wrong endpoint", url="/v1/classify"), ""]
    file = jsonl(lines)
    async with jobs_client() as client:
        uploaded = await upload(client, file)
        assert uploaded.status_code == 200, uploaded.text
        meta = uploaded.json()
        assert (meta["object"], meta["purpose"], meta["bytes"], meta["status"]) == (
            "file", "batch", len(file), "processed",
        )  # fmt: skip
        assert (await client.get(f"/v1/files/{meta['id']}")).json() == meta
        assert (await client.get(f"/v1/files/{meta['id']}/content")).content == file
        created = await client.post(
            "/v1/batches",
            json={"input_file_id": meta["id"], "endpoint": "/v1/moderations",
                  "completion_window": "24h", "metadata": {"team": "mail"}},
        )  # fmt: skip
        assert created.status_code == 200, created.text
        batch = created.json()
        assert batch["status"] == "validating" and batch["request_counts"]["total"] == 42
        assert batch["metadata"] == {"team": "mail"} and batch["model"] == "fake-linformer"
        done = await wait_for(client, batch["id"])
        assert done["status"] == "completed"
        assert done["request_counts"] == {"total": 42, "completed": 40, "failed": 2}
        for stamp in ("in_progress_at", "finalizing_at", "completed_at"):
            assert done[stamp] >= done["created_at"]
        output = await content(client, done["output_file_id"])
        errors = await content(client, done["error_file_id"])
        assert [x["custom_id"] for x in output] == [f"m{i}" for i in range(40)]
        assert [x["error"]["code"] for x in errors] == ["invalid_json_line", "invalid_url"]
        # Each output line is what POST /v1/moderations answers for that body.
        for line, request in zip(output, lines, strict=False):
            assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None
            response = line["response"]
            assert response["status_code"] == 200 and response["request_id"].startswith("req_")
            assert response["body"]["id"] == "modr-" + response["request_id"][4:]
            direct = await client.post("/v1/moderations", json=request["body"])
            assert without_ids(response["body"]) == without_ids(direct.json())
        out_meta = (await client.get(f"/v1/files/{done['output_file_id']}")).json()
        assert out_meta["purpose"] == "batch_output"
        assert out_meta["bytes"] == len(
            (await client.get(f"/v1/files/{out_meta['id']}/content")).content
        )
        listed = (await client.get("/v1/batches")).json()
        assert listed["object"] == "list" and listed["data"][0] == done
        metrics = (await client.get("/metrics")).text
        assert 'linmod_batch_job_lines_total{outcome="succeeded"} 40.0' in metrics
        assert 'linmod_batch_job_lines_total{outcome="failed"} 2.0' in metrics
        await until(lambda: 'linmod_batch_jobs{status="completed"} 1.0' in get_metrics(client))


def get_metrics(client: httpx.AsyncClient) -> str:
    transport = client._transport
    assert isinstance(transport, httpx.ASGITransport)
    return get_state(transport.app).metrics.render().decode()  # type: ignore[arg-type]


async def test_lines_answer_as_the_endpoint_would(jobs_client: Callable[..., Any]) -> None:
    bodies: list[Any] = [
        {"input": "Lunch at noon?"},
        {"input": ["a list", "of texts"]},
        {"input": LONG_TEXT},
        {"input": LONG_TEXT, "long_document": "truncate", "aggregation": "mean"},
        {"input": LONG_TEXT, "long_document": "reject"},  # 413
        {"input": "x" * 3000},  # over max_chars: 413
        {"input": ["a"] * 5},  # over max_inputs: 413
        {"input": ""},  # 422
        {"input": "a", "temperature": 1},  # 422
        [1, 2],  # 422
        "just a string",  # 422
    ]
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/classify", "body": body}
        for i, body in enumerate(bodies)
    ]
    async with jobs_client(max_chars=2000, max_inputs=4) as client:
        done = await run(client, jsonl(lines), "/v1/classify")
        assert done["request_counts"] == {"total": 11, "completed": 4, "failed": 7}
        answered = await content(client, done["output_file_id"])
        answered += await content(client, done["error_file_id"])
        by_id = {x["custom_id"]: x["response"] for x in answered}
        for i, body in enumerate(bodies):
            direct = await client.post("/v1/classify", json=body)
            assert by_id[f"c{i}"]["status_code"] == direct.status_code, body
            assert without_ids(by_id[f"c{i}"]["body"]) == without_ids(direct.json()), body


async def test_the_openai_client_end_to_end(
    fake_artifact: Path, model_config: ArtifactConfig
) -> None:
    engine = ControlledEngine(model_config)
    app = create_app(make_settings(fake_artifact, warmup=False, **FAST), engine=engine)
    async with serving(app):
        http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://t")
        client = AsyncOpenAI(api_key="unused", base_url="http://t/v1", http_client=http,
                             max_retries=0)  # fmt: skip
        lines = [request_line(f"r{i}", TEXTS[i % 4]) for i in range(12)]
        file = await client.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
        assert file.purpose == "batch" and file.bytes == len(jsonl(lines))
        assert (await client.files.retrieve(file.id)).id == file.id
        batch = await client.batches.create(
            input_file_id=file.id, endpoint="/v1/moderations", completion_window="24h",
            metadata={"run": "1"},
        )  # fmt: skip
        assert batch.status == "validating" and batch.metadata == {"run": "1"}
        for _ in range(2000):
            if batch.status in ("completed", "failed"):
                break
            await asyncio.sleep(0.01)
            batch = await client.batches.retrieve(batch.id)
        assert batch.status == "completed" and batch.request_counts is not None
        assert (batch.request_counts.completed, batch.request_counts.failed) == (12, 0)
        output = await client.files.content(batch.output_file_id or "")
        assert [x["custom_id"] for x in parse_lines(output.text)] == [f"r{i}" for i in range(12)]
        assert (await client.files.content(file.id)).content == jsonl(lines)

        engine.gate.clear()  # the second batch's lines wait in the engine
        while engine.entered.acquire(blocking=False):  # forget the first batch's runs
            pass
        second = await client.batches.create(
            input_file_id=file.id, endpoint="/v1/moderations", completion_window="24h"
        )
        assert await until_async(lambda: engine.entered.acquire(timeout=0.01))
        cancelling = await client.batches.cancel(second.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        for _ in range(2000):  # lines held in the engine are let go
            if cancelling.status == "cancelled":
                break
            await asyncio.sleep(0.01)
            cancelling = await client.batches.retrieve(second.id)
        engine.gate.set()
        counts = cancelling.request_counts
        assert counts is not None and (counts.completed, counts.failed, counts.total) == (0, 12, 12)
        assert cancelling.output_file_id is None and cancelling.error_file_id is not None
        errors = parse_lines((await client.files.content(cancelling.error_file_id)).text)
        assert sorted(x["custom_id"] for x in errors) == sorted(f"r{i}" for i in range(12))
        assert {x["error"]["code"] for x in errors} == {"batch_cancelled"}

        listed = [b.id async for b in client.batches.list(limit=1)]  # pages of one
        assert listed == [second.id, batch.id]
        deleted = await client.files.delete(file.id)
        assert deleted.deleted and deleted.id == file.id
        await http.aclose()


async def until_async(condition: Callable[[], bool], attempts: int = 2000) -> bool:
    """Poll a blocking condition off the loop (it may wait a little itself)."""
    for _ in range(attempts):
        if await asyncio.to_thread(condition):
            return True
    return False


async def test_bad_input_is_a_clear_4xx_and_nothing_is_lost(
    jobs_client: Callable[..., Any],
) -> None:
    good = jsonl([request_line("a", "hello"), request_line("b", "there")])
    async with jobs_client(job_max_file_bytes=4000, job_max_file_lines=5, max_body_bytes=1000) as c:
        cases = [
            (await upload(c, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"), 400, "invalid_file"),
            (await upload(c, b"custom_id,text\na,hello\n"), 400, "invalid_file"),
            (await upload(c, b'[\n  {"custom_id": "a"}\n]\n'), 400, "invalid_file"),
            (await upload(c, b"\n\n"), 400, "invalid_file"),
            (await upload(c, b'{"a": "\xff"}\n'), 400, "invalid_file"),
            (await upload(c, good, purpose="fine-tune"), 400, "invalid_purpose"),
            (await c.post("/v1/files", files={"file": ("x.jsonl", good)}), 400, "missing_purpose"),
            (await c.post("/v1/files", data={"purpose": "batch"}, files={"other": ("x", b"1")}),
             400, "missing_file"),
            (await c.post("/v1/files", json={"purpose": "batch"}), 415, "unsupported_media_type"),
            (await upload(c, good * 100), 413, "file_too_large"),
            (await upload(c, good * 3), 413, "too_many_lines"),
            (await upload(c, jsonl([request_line("a", "x" * 2000)])), 413, "line_too_long"),
            (await upload(c, b"{}" * 1_000_000), 413, "body_too_large"),
            (await c.get("/v1/files/file-nope"), 404, "file_not_found"),
            (await c.get("/v1/files/file-nope/content"), 404, "file_not_found"),
            (await c.delete("/v1/files/file-nope"), 404, "file_not_found"),
            (await c.get("/v1/batches/batch_nope"), 404, "batch_not_found"),
            (await c.post("/v1/batches/batch_nope/cancel"), 404, "batch_not_found"),
            (await c.get("/v1/batches", params={"limit": 0}), 422, "invalid_input"),
            (await c.get("/v1/batches", params={"after": "batch_nope"}), 404, "batch_not_found"),
        ]  # fmt: skip
        file_id = (await upload(c, good)).json()["id"]
        batch = {
            "input_file_id": file_id,
            "endpoint": "/v1/moderations",
            "completion_window": "24h",
        }
        post = c.post
        cases += [
            (await post("/v1/batches", json=batch | {"input_file_id": "file-nope"}), 404, "file_not_found"),
            (await post("/v1/batches", json=batch | {"endpoint": "/v1/chat/completions"}), 422, "invalid_input"),
            (await post("/v1/batches", json=batch | {"completion_window": "1h"}), 422, "invalid_input"),
            (await post("/v1/batches", json=batch | {"metadata": {str(i): "v" for i in range(17)}}),
             422, "invalid_input"),
            (await post("/v1/batches", content=b"input_file_id=x"), 415, "unsupported_media_type"),
        ]  # fmt: skip
        for response, status, code in cases:
            assert response.status_code == status, (code, response.text)
            error = error_of(response)
            assert error["code"] == code and error["message"], error
        endpoint_error = error_of(cases[-4][0])["message"]
        assert "/v1/moderations" in endpoint_error and "/v1/classify" in endpoint_error

        done = await wait_for(c, (await post("/v1/batches", json=batch)).json()["id"])
        assert done["status"] == "completed" and done["request_counts"]["completed"] == 2
        finished = await c.post(f"/v1/batches/{done['id']}/cancel")
        assert finished.status_code == 409 and error_of(finished)["code"] == "invalid_state"
        assert "completed" in error_of(finished)["message"]
        from_output = await post(
            "/v1/batches", json=batch | {"input_file_id": done["output_file_id"]}
        )
        assert (
            from_output.status_code == 400 and error_of(from_output)["code"] == "invalid_input_file"
        )
        # Nothing refused was kept, and what was accepted is intact.
        assert (await c.get(f"/v1/batches/{done['id']}")).json() == done
        assert (await c.get(f"/v1/files/{file_id}/content")).content == good


async def test_refused_uploads_leave_no_rows(
    fake_artifact: Path, model_config: ArtifactConfig, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    settings = make_settings(fake_artifact, database_url=url, job_max_file_lines=5, **FAST)
    app = create_app(settings, engine=FakeEngine(model_config))
    many = jsonl([request_line(f"r{i}", "text") for i in range(2000)])  # stored in pages, then 413
    async with serving(app) as client:
        assert (await upload(client, many)).status_code == 413
        assert (await upload(client, jsonl([request_line("a", "x")]) + b"\x00")).status_code == 400
        kept = (await upload(client, jsonl([request_line("a", "x")]))).json()["id"]
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT id FROM linmod_files")).scalars().all() == [kept]
        assert conn.execute(text("SELECT count(*) FROM linmod_file_lines")).scalar() == 1
    engine.dispose()


async def test_files_and_batches_belong_to_their_key(jobs_client: Callable[..., Any]) -> None:
    k1, k2 = ({"authorization": f"Bearer {k}"} for k in ("k1", "k2"))
    async with jobs_client(api_keys="k1,k2") as c:
        assert (await upload(c, jsonl([request_line("a", "x")]))).status_code == 401
        file_id = (await upload(c, jsonl([request_line("a", "x")]), headers=k1)).json()["id"]
        body = {"input_file_id": file_id, "endpoint": "/v1/moderations", "completion_window": "24h"}
        batch_id = (await c.post("/v1/batches", json=body, headers=k1)).json()["id"]
        others = [
            await c.get(f"/v1/files/{file_id}", headers=k2),
            await c.get(f"/v1/files/{file_id}/content", headers=k2),
            await c.delete(f"/v1/files/{file_id}", headers=k2),
            await c.post("/v1/batches", json=body, headers=k2),
            await c.get(f"/v1/batches/{batch_id}", headers=k2),
            await c.post(f"/v1/batches/{batch_id}/cancel", headers=k2),
        ]
        for response in others:
            assert response.status_code == 404, response.text
            assert error_of(response)["code"] in ("file_not_found", "batch_not_found")
        assert (await c.get("/v1/batches", headers=k2)).json()["data"] == []
        done = await wait_for(c, batch_id, headers=k1)
        assert done["status"] == "completed"
        assert (await c.get("/v1/batches", headers=k1)).json()["data"][0]["id"] == batch_id
        output = done["output_file_id"]
        assert (await c.get(f"/v1/files/{output}/content", headers=k2)).status_code == 404
        assert (await c.get(f"/v1/files/{output}/content", headers=k1)).status_code == 200


async def test_old_batches_and_files_are_deleted(jobs_client: Callable[..., Any]) -> None:
    # Retention long enough for the batch to finish on a busy host first: a shorter one can expire
    # the input file while the batch still validates it.
    async with jobs_client(job_retention_s=2.0, job_cleanup_interval_s=0.02) as client:
        done = await run(client, jsonl([request_line("a", "x")]), "/v1/moderations")
        assert done["status"] == "completed"
        ids = [done["input_file_id"], done["output_file_id"]]
        for _ in range(1000):
            if (await client.get(f"/v1/batches/{done['id']}")).status_code == 404:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the batch was never deleted")
        for file_id in ids:
            assert (await client.get(f"/v1/files/{file_id}")).status_code == 404


async def test_a_batch_past_its_window_expires(
    fake_artifact: Path, model_config: ArtifactConfig
) -> None:
    engine = ControlledEngine(model_config)
    app = create_app(make_settings(fake_artifact, warmup=False, **FAST), engine=engine)
    now = [1_700_000_000.0]
    worker = get_state(app).jobs
    assert worker is not None
    worker.clock = lambda: now[0]
    async with serving(app) as client:
        engine.gate.clear()
        lines = jsonl([request_line(f"r{i}", TEXTS[i % 4]) for i in range(30)])
        file_id = (await upload(client, lines)).json()["id"]
        body = {"input_file_id": file_id, "endpoint": "/v1/moderations", "completion_window": "24h"}
        batch = (await client.post("/v1/batches", json=body)).json()
        assert batch["expires_at"] == int(now[0]) + 24 * 3600
        assert await until_async(lambda: engine.entered.acquire(timeout=0.01))
        now[0] += 24 * 3600 + 1
        expired = await wait_for(client, batch["id"])
        engine.gate.set()
        assert expired["status"] == "expired" and expired["expired_at"] == int(now[0])
        counts = expired["request_counts"]
        assert counts["total"] == 30 and counts["completed"] + counts["failed"] == 30
        errors = await content(client, expired["error_file_id"])
        assert {x["error"]["code"] for x in errors} == {"batch_expired"}


async def test_shutdown_hands_unfinished_lines_back(
    fake_artifact: Path, model_config: ArtifactConfig, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    engine = ControlledEngine(model_config)
    settings = make_settings(
        fake_artifact, warmup=False, database_url=url, shutdown_timeout_s=0.05, **FAST
    )
    app = create_app(settings, engine=engine)
    async with serving(app) as client:
        engine.gate.clear()
        lines = jsonl([request_line(f"r{i}", TEXTS[i % 4]) for i in range(20)])
        file_id = (await upload(client, lines)).json()["id"]
        body = {"input_file_id": file_id, "endpoint": "/v1/moderations", "completion_window": "24h"}
        batch_id = (await client.post("/v1/batches", json=body)).json()["id"]
        assert await until_async(lambda: engine.entered.acquire(timeout=0.01))
    engine.gate.set()
    db = create_engine(url)
    with db.connect() as conn:
        states = conn.execute(
            text(
                "SELECT state, count(*) FROM linmod_batch_lines WHERE batch_id = :b GROUP BY state"
            ),
            {"b": batch_id},
        ).all()
        attempts = conn.execute(text("SELECT max(attempts) FROM linmod_batch_lines")).scalar()
    db.dispose()
    # Lines already answered were written; the rest are free for any worker at once.
    assert "claimed" not in dict(states) and sum(n for _, n in states) == 20
    assert attempts in (0, 1)


async def test_the_cli_client_runs_a_batch(
    fake_artifact: Path, model_config: ArtifactConfig, tmp_path: Path
) -> None:
    app = create_app(make_settings(fake_artifact, **FAST), engine=FakeEngine(model_config))
    source = tmp_path / "mail.jsonl"
    source.write_bytes(jsonl([request_line(f"r{i}", TEXTS[i % 4]) for i in range(25)] + ["oops"]))
    async with serving(app) as client:
        batch = await run_batch(
            client, source, endpoint="/v1/moderations", output=tmp_path / "out.jsonl",
            errors=tmp_path / "err.jsonl", metadata={"from": "cli"}, poll_s=0.01,
        )  # fmt: skip
    assert batch["status"] == "completed" and batch["metadata"] == {"from": "cli"}
    assert len(parse_lines((tmp_path / "out.jsonl").read_bytes())) == 25
    (error,) = parse_lines((tmp_path / "err.jsonl").read_bytes())
    assert error["error"]["code"] == "invalid_json_line"


async def test_interactive_requests_overtake_a_running_job(
    fake_artifact: Path, model_config: ArtifactConfig
) -> None:
    engine = ControlledEngine(model_config)
    settings = make_settings(
        fake_artifact, warmup=False, max_batch_size=4, **(FAST | {"job_claim_lines": 64})
    )
    app = create_app(settings, engine=engine)
    async with serving(app) as client:
        batcher = get_state(app).batcher
        assert batcher is not None
        engine.gate.clear()
        lines = jsonl([request_line(f"r{i}", TEXTS[i % 4]) for i in range(200)])
        done = asyncio.create_task(run(client, lines, "/v1/moderations"))
        await until(lambda: batcher.queued(Priority.BATCH)[0] >= 64, attempts=2000)  # job queued
        runs_before = len(engine.seen)
        interactive = asyncio.create_task(client.post("/v1/classify", json={"input": "Lunch?"}))
        registry = get_state(app).metrics.registry

        def admitted() -> float:  # queued, or already formed into a batch
            labels = {"priority": "interactive"}
            taken = registry.get_sample_value("linmod_queue_wait_seconds_count", labels) or 0
            return taken + batcher.queued(Priority.INTERACTIVE)[0]

        await until(lambda: admitted() == 1, attempts=2000)
        engine.gate.set()
        assert (await interactive).status_code == 200
        assert (await done)["request_counts"]["completed"] == 200
    # The interactive window ran at most one batch after the held one (a job batch may have been
    # formed already), while the job's queue was still long.
    (wanted,) = DocumentEncoder.from_file(fake_artifact / "tokenizer.json").encode(["Lunch?"])
    later = engine.seen[runs_before:]
    position = next(
        i
        for i, ids in enumerate(later)
        if any(list(row[: wanted.size]) == list(wanted) for row in ids)
    )
    assert position <= 1 and len(later) > 10, (position, len(later))
