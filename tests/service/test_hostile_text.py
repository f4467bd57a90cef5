"""Text no tokenizer or database can hold (lone surrogates, NUL) gets a clear 4xx on every field
that carries text, a batch line with it fails alone, and one failing batch never holds up others.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jobs_testing import jsonl, parse_lines, request_line, upload, wait_for
from service_testing import make_settings, serving

from service.app import create_app
from service.artifact import ArtifactConfig
from service.engine import FakeEngine
from service.jobs import lifecycle
from service.texts import check_text, clean_filename, text_problem

JSON = {"content-type": "application/json"}
SURROGATE = "\ud800"
# Any code point, lone surrogates and NUL included (hypothesis leaves surrogates out by default).
ANY_TEXT = st.text(st.characters(codec=None, categories=None), max_size=40) | st.sampled_from(
    [SURROGATE, "\udfff", "a\x00b", "\x00", "x\ud83d", "\ud83d\ude00"]
)


def raw(body: dict[str, Any]) -> bytes:
    """JSON as a client may send it: lone surrogates escaped as \\udXXX (valid JSON syntax)."""
    return json.dumps(body).encode()


@pytest.fixture
async def client(
    fake_artifact: Path, model_config: ArtifactConfig
) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(fake_artifact, job_poll_s=0.01, job_claim_lines=8)
    async with serving(create_app(settings, engine=FakeEngine(model_config))) as c:
        yield c


def test_the_validator_names_the_problem() -> None:
    assert text_problem("café ✓ 😀") is None
    assert "surrogate U+D800" in (text_problem("ab\ud800") or "")
    assert "NUL" in (text_problem("a\x00") or "")
    with pytest.raises(ValueError, match=r"custom_id contains a lone UTF-16 surrogate U\+DFFF"):
        check_text("x\udfff", "custom_id")


@pytest.mark.parametrize(
    ("raw_name", "stored"),
    [
        ("тест.jsonl", "тест.jsonl"),
        ("a\r\nSet-Cookie: x=1.jsonl", "aSet-Cookie: x=1.jsonl"),
        ("../../etc/passwd", "passwd"),
        ("C:\\dir\\x.jsonl", "x.jsonl"),
        ("\x00\x01", "upload.jsonl"),
        ("..", "upload.jsonl"),
        ("evil\u202etxt.exe", "eviltxt.exe"),
        ("😀" * 300, "😀" * 255),
    ],
)
def test_filenames_are_cleaned(raw_name: str, stored: str) -> None:
    assert clean_filename(raw_name) == stored


@pytest.mark.parametrize("path", ["/v1/classify", "/v1/moderations"])
@pytest.mark.parametrize(
    "body",
    [
        {"input": SURROGATE},
        {"input": ["fine", f"bad {SURROGATE} text"]},
        {"input": "a\x00b"},
    ],
)
async def test_unusable_text_is_a_422(
    client: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> None:
    response = await client.post(path, content=raw(body), headers=JSON)
    assert response.status_code == 422, response.text
    assert "surrogate" in response.text or "NUL" in response.text
    assert (await client.post(path, json={"input": "still serving"})).status_code == 200


async def test_text_parts_and_model_are_checked(client: httpx.AsyncClient) -> None:
    parts = {"input": [{"type": "text", "text": SURROGATE}]}
    response = await client.post("/v1/moderations", content=raw(parts), headers=JSON)
    assert response.status_code == 422, response.text
    model = {"input": "x", "model": SURROGATE}
    response = await client.post("/v1/moderations", content=raw(model), headers=JSON)
    assert response.status_code == 422, response.text


@pytest.mark.parametrize(
    "body",
    [
        {"input_file_id": SURROGATE},
        {"input_file_id": "file-\x00"},
        {"input_file_id": "file-x", "metadata": {SURROGATE: "v"}},
        {"input_file_id": "file-x", "metadata": {"k": "v\x00"}},
    ],
)
async def test_batch_fields_are_checked(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    full = {"endpoint": "/v1/moderations", "completion_window": "24h", **body}
    response = await client.post("/v1/batches", content=raw(full), headers=JSON)
    assert response.status_code == 422, response.text


@pytest.mark.parametrize(
    "url",
    [
        "/v1/files/file-%00",
        "/v1/files/file-%00/content",
        "/v1/batches/b%00",
        "/v1/batches?after=%00",
    ],
)
async def test_ids_in_paths_and_queries_are_checked(client: httpx.AsyncClient, url: str) -> None:
    response = await client.get(url)
    assert response.status_code == 422, response.text


async def test_a_poisoned_custom_id_fails_only_its_line(client: httpx.AsyncClient) -> None:
    lines = [
        request_line("ok-1", "hello there"),
        json.dumps(request_line(SURROGATE, "poisoned id")),
        request_line("nul\x00id", "poisoned id"),
        request_line("ok-2", "bye now"),
    ]
    uploaded = await upload(client, jsonl(lines))
    assert uploaded.status_code == 200, uploaded.text
    body = {"input_file_id": uploaded.json()["id"], "endpoint": "/v1/moderations"}
    created = await client.post("/v1/batches", json=body | {"completion_window": "24h"})
    batch = await wait_for(client, created.json()["id"])
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
    errors = parse_lines((await client.get(f"/v1/files/{batch['error_file_id']}/content")).content)
    assert [e["error"]["code"] for e in errors] == ["invalid_custom_id"] * 2
    assert "line 2: custom_id contains a lone UTF-16 surrogate" in errors[0]["error"]["message"]
    assert "line 3: custom_id contains a NUL" in errors[1]["error"]["message"]


async def test_a_batch_whose_validation_fails_fails_alone(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever breaks one batch's validation fails that batch at once; the others still run."""
    real = lifecycle.LineValidator

    class Exploding(real):  # type: ignore[misc,valid-type]
        def __call__(self, line_no: int, text: str) -> Any:
            if "explode" in text:
                raise RuntimeError("the database refused a row")
            return super().__call__(line_no, text)

    monkeypatch.setattr(lifecycle, "LineValidator", Exploding)
    ids = []
    for text in ("explode", "fine"):
        uploaded = await upload(client, jsonl([request_line("a", text)]))
        body = {"input_file_id": uploaded.json()["id"], "endpoint": "/v1/moderations"}
        created = await client.post("/v1/batches", json=body | {"completion_window": "24h"})
        ids.append(created.json()["id"])
    bad, good = [await wait_for(client, batch_id) for batch_id in ids]
    assert good["status"] == "completed" and good["request_counts"]["completed"] == 1, good
    assert bad["status"] == "failed", bad
    assert bad["errors"]["data"][0]["code"] == "validation_failed"


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=ANY_TEXT)
async def test_any_text_in_any_text_field_is_never_a_5xx(
    client: httpx.AsyncClient, text: str
) -> None:
    """Every text field of every JSON body, each path and query id: a 2xx or a clean 4xx."""
    batch = {"endpoint": "/v1/moderations", "completion_window": "24h"}
    requests = [
        ("POST", "/v1/classify", {"input": text}),
        ("POST", "/v1/classify", {"input": ["x", text]}),
        ("POST", "/v1/moderations", {"input": text, "model": text}),
        ("POST", "/v1/moderations", {"input": [{"type": "text", "text": text}]}),
        ("POST", "/v1/batches", batch | {"input_file_id": text}),
        ("POST", "/v1/batches", batch | {"input_file_id": "f", "metadata": {text: text}}),
    ]
    for method, path, body in requests:
        response = await client.request(method, path, content=raw(body), headers=JSON)
        assert response.status_code < 500, (path, body, response.text)
    # Paths and queries are bytes on the wire: the text's UTF-8, surrogates passed through.
    escaped = quote(text.encode("utf-8", "surrogatepass"), safe="")
    for url in ("/v1/files/{}", "/v1/files/{}/content", "/v1/batches/{}", "/v1/batches?after={}"):
        response = await client.get(url.format(escaped))
        assert response.status_code < 500, (url, text, response.text)


def test_the_ascii_fast_path_finds_what_the_scan_finds() -> None:
    from service.texts import text_problem

    assert text_problem("plain ascii") is None
    assert text_problem("ab\x00c") == "contains a NUL character (at 2)"
    assert text_problem("caf\u00e9\x00") == "contains a NUL character (at 4)"
    assert "U+D800" in (text_problem("x\ud800") or "")
    assert text_problem("caf\u00e9") is None
