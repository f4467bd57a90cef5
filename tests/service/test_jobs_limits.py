"""Files under hostile use: any filename downloads (RFC 6266/5987), per-key quotas on files and
bytes, expired files gone at once, and file content read in pages of bounded size.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from jobs_testing import jsonl, request_line, upload
from service_testing import make_settings, serving

from service.app import create_app
from service.artifact import ArtifactConfig
from service.engine import FakeEngine
from service.jobs.db import Database
from service.jobs.store import JobStore
from service.texts import content_disposition

LINE = jsonl([request_line("a", "hello")])


@pytest.fixture
def jobs_app(fake_artifact: Path, model_config: ArtifactConfig) -> Callable[..., Any]:
    @asynccontextmanager
    async def make(**overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
        settings = make_settings(fake_artifact, **overrides)
        async with serving(create_app(settings, engine=FakeEngine(model_config))) as client:
            yield client

    return make


def multipart(filename: bytes, content: bytes) -> tuple[bytes, dict[str, str]]:
    """A form with a raw filename, as a hostile client can send it."""
    body = (
        b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
        b"Content-Type: application/jsonl\r\n\r\n" + content + b"\r\n--b--\r\n"
    )
    return body, {"content-type": "multipart/form-data; boundary=b"}


def name_in(disposition: str) -> str:
    """The filename a client that reads RFC 5987 takes from the header."""
    encoded = disposition.split("filename*=UTF-8''", 1)[1]
    return unquote(encoded, errors="strict")


@pytest.mark.parametrize(
    ("sent", "served"),
    [
        ("тест.jsonl".encode(), "тест.jsonl"),
        ("😀 batch.jsonl".encode(), "😀 batch.jsonl"),
        (b"a\x01b\x7fc.jsonl", "abc.jsonl"),
        (b"semi;colon, 'quoted' 100%.jsonl", "semi;colon, 'quoted' 100%.jsonl"),
        (b"\xff\xfe.jsonl", "\ufffd\ufffd.jsonl"),
    ],
)
async def test_any_filename_downloads(
    jobs_app: Callable[..., Any], sent: bytes, served: str
) -> None:
    async with jobs_app() as client:
        body, headers = multipart(sent, LINE)
        uploaded = await client.post("/v1/files", content=body, headers=headers)
        assert uploaded.status_code == 200, uploaded.text
        assert uploaded.json()["filename"] == served
        response = await client.get(f"/v1/files/{uploaded.json()['id']}/content")
        assert response.status_code == 200, response.text
        assert response.content == LINE
        disposition = response.headers["content-disposition"]
        assert disposition.isascii() and name_in(disposition) == served


def test_the_header_is_ascii_without_controls() -> None:
    header = content_disposition('x"\r\nSet-Cookie: a=1;%20é.jsonl')
    assert header.isascii() and "\r" not in header and "\n" not in header
    assert header.startswith('attachment; filename="x_Set-Cookie: a=1;_20_.jsonl"; ')
    assert name_in(header) == 'x"Set-Cookie: a=1;%20é.jsonl'


async def test_a_key_holds_at_most_its_quota_of_files(jobs_app: Callable[..., Any]) -> None:
    async with jobs_app(job_quota_files=2, api_keys="k1,k2") as client:
        k1, k2 = ({"authorization": f"Bearer {k}"} for k in ("k1", "k2"))
        first = await upload(client, LINE, headers=k1)
        assert (await upload(client, LINE, headers=k1)).status_code == 200
        refused = await upload(client, LINE, headers=k1)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "file_count_quota_exceeded"
        assert (await upload(client, LINE, headers=k2)).status_code == 200  # its own quota
        deleted = await client.delete(f"/v1/files/{first.json()['id']}", headers=k1)
        assert deleted.status_code == 200
        assert (await upload(client, LINE, headers=k1)).status_code == 200


async def test_a_key_holds_at_most_its_quota_of_bytes(jobs_app: Callable[..., Any]) -> None:
    big = jsonl([request_line(f"r{i}", "x" * 50) for i in range(20)])  # ~2 KB
    async with jobs_app(job_quota_bytes=3 * len(big) // 2) as client:
        assert (await upload(client, big)).status_code == 200
        refused = await upload(client, big)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "storage_quota_exceeded"
        assert "bytes of storage" in refused.json()["error"]["message"]
        assert (await upload(client, LINE)).status_code == 200  # what fits still does


async def test_expired_files_are_gone_before_cleanup(jobs_app: Callable[..., Any]) -> None:
    async with jobs_app(job_retention_s=0.3, job_quota_files=1) as client:
        uploaded = await upload(client, LINE)
        file_id = uploaded.json()["id"]
        assert (await client.get(f"/v1/files/{file_id}")).status_code == 200
        await asyncio.sleep(0.4)
        for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
            assert (await client.get(path)).status_code == 404, path
        batch = {
            "input_file_id": file_id,
            "endpoint": "/v1/moderations",
            "completion_window": "24h",
        }
        assert (await client.post("/v1/batches", json=batch)).status_code == 404
        assert (await upload(client, LINE)).status_code == 200  # it no longer counts


def test_content_is_read_in_pages_of_bounded_size() -> None:
    db = Database("sqlite://")
    db.create_schema()
    store = JobStore(db)
    line = '{"custom_id": "x", "body": "' + "y" * 100_000 + '"}\n'
    file_id, _ = store.begin_file(None, "big.jsonl")
    store.add_lines(file_id, [(n, line) for n in range(1, 21)])
    record = store.complete_file(file_id, size=20 * len(line), lines=20, ttl_s=60)
    pages, after = [], 0
    while page := store.read_content(record, after, 1000, 256 * 1024):
        pages.append(page)
        after = page[-1][0]
    assert [len(p) for p in pages] == [2] * 10
    alone = store.read_content(record, 0, 1000, 10)  # one line longer than the bound still comes
    assert len(alone) == 1 and alone[0][1] == line
    db.close()
