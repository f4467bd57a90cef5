"""Batch files line by line: the upload splitter and its checks, request-line parsing, and an
upload streamed to the store in bounded memory.
"""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from jobs_testing import request_line
from service_testing import make_settings, serving

from service.app import create_app
from service.artifact import ArtifactConfig
from service.engine import FakeEngine
from service.jobs.jsonl import FileRejectedError, JsonlSplitter, LineValidator


def split(data: bytes, chunk: int, **limits: int) -> JsonlSplitter:
    splitter = JsonlSplitter(
        max_bytes=limits.get("max_bytes", 10**9),
        max_lines=limits.get("max_lines", 10**6),
        max_line_bytes=limits.get("max_line_bytes", 10**6),
    )
    for start in range(0, len(data), chunk):
        splitter.feed(data[start : start + chunk])
    splitter.finish()
    return splitter


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 10_000])
def test_lines_survive_any_chunking(chunk: int) -> None:
    data = '\ufeff{"a": 1}\r\n\n{"b": "é"}\n   \n{"c": [1,\n'.encode() + b"2]}"
    splitter = split(data, chunk)
    texts = [text for _, text in splitter.ready]
    assert "".join(texts).encode() == data  # every byte kept, newlines included
    assert [n for n, _ in splitter.ready] == [1, 2, 3, 4, 5, 6]
    assert splitter.requests == 4 and splitter.bytes == len(data)


@pytest.mark.parametrize(
    ("data", "status", "code", "fragment"),
    [
        (b"a,b\n1,2\n", 400, "invalid_file", "line 1 is not a JSON object"),
        (b"\n\n[1, 2]\n", 400, "invalid_file", "line 3 is not a JSON object"),
        (b'{"a": 1}\n\x00\x01\n', 400, "invalid_file", "line 2 contains a NUL byte"),
        (b'{"a": "\xe9"}\n', 400, "invalid_file", "line 1 is not UTF-8"),
        (b"\n \n", 400, "invalid_file", "no requests"),
        (b'{"a": 1}\n' * 4, 413, "too_many_lines", "more than 3 requests"),
        (b'{"a": 1}\n' + b"\n" * 300, 413, "file_too_large", "over the limit of 200 bytes"),
        (b'{"a": "' + b"x" * 100 + b'"}\n', 413, "line_too_long", "line 1 is over the limit"),
        (b'{"a": "' + b"x" * 100, 413, "line_too_long", "line 1 is over the limit"),
    ],
)
def test_refused_files(data: bytes, status: int, code: str, fragment: str) -> None:
    with pytest.raises(FileRejectedError) as refused:
        split(data, 5, max_bytes=200, max_lines=3, max_line_bytes=50)
    assert (refused.value.status, refused.value.code) == (status, code)
    assert fragment in refused.value.message


def test_request_lines_are_parsed_or_refused_with_a_reason() -> None:
    parse = LineValidator("/v1/classify")
    good = parse(1, json.dumps(request_line("a", "hi", url="/v1/classify")) + "\n")
    assert good is not None and good.error_code is None
    assert (good.custom_id, json.loads(good.body or "")) == ("a", {"input": "hi"})
    assert parse(2, "  \r\n") is None
    lenient = parse(3, json.dumps({"custom_id": "b", "url": "/v1/classify", "body": {"x": 1}}))
    assert lenient is not None and lenient.error_code is None  # method defaults to POST
    refused = {
        "{": "invalid_json_line",
        "7": "invalid_json_line",
        '{"custom_id": "", "url": "/v1/classify", "body": {}}': "missing_custom_id",
        '{"custom_id": 5, "url": "/v1/classify", "body": {}}': "missing_custom_id",
        '{"custom_id": "a", "url": "/v1/classify", "body": {}}': "duplicate_custom_id",
        '{"custom_id": "c", "method": "PUT", "url": "/v1/classify", "body": {}}': "invalid_method",
        '{"custom_id": "d", "url": "/v1/moderations", "body": {}}': "invalid_url",
        '{"custom_id": "e", "body": {}}': "invalid_url",
        '{"custom_id": "f", "url": "/v1/classify"}': "missing_body",
    }
    for n, (text, code) in enumerate(refused.items(), start=10):
        parsed = parse(n, text)
        assert parsed is not None and parsed.error_code == code, text
        assert (parsed.error_message or "").startswith(f"line {n}: ")


async def test_an_upload_streams_to_the_store_in_bounded_memory(
    fake_artifact: Path, model_config: ArtifactConfig, tmp_path: Path
) -> None:
    settings = make_settings(fake_artifact, database_url=f"sqlite:///{tmp_path / 'jobs.db'}")
    app = create_app(settings, engine=FakeEngine(model_config))
    boundary = "linmod-test-boundary"
    n, filler = 16_000, "spam and ham " * 75  # ~1 KB a line, ~16 MB in all
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="big.jsonl"\r\nContent-Type: application/jsonl\r\n\r\n'
        ).encode()
        chunk = bytearray()
        for i in range(n):
            chunk += (json.dumps(request_line(f"r{i}", filler)) + "\n").encode()
            if len(chunk) >= 64 * 1024 or i == n - 1:
                sent += len(chunk)
                yield bytes(chunk)
                chunk.clear()
        yield f"\r\n--{boundary}--\r\n".encode()

    async with serving(app) as client:
        headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
        tracemalloc.start()
        try:
            response = await client.post("/v1/files", content=body(), headers=headers)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert response.status_code == 200, response.text
        assert response.json()["bytes"] == sent > 16_000_000
        # Python never held more than a small part of the file at once.
        assert peak < sent / 4, f"peak {peak / 1e6:.1f} MB for a {sent / 1e6:.1f} MB file"
        content = await client.get(f"/v1/files/{response.json()['id']}/content")
        assert len(content.content) == sent
        assert isinstance(client, httpx.AsyncClient)
