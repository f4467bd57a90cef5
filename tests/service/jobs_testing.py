"""Helpers of the batch-job tests: PostgreSQL in a throwaway schema, batch files, polling."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_testing import free_port, wait_server_ready
from sqlalchemy import create_engine, text
from sqlalchemy.exc import SQLAlchemyError

REPO = Path(__file__).resolve().parents[2]
PG_HOST = "127.0.0.1:5432"
PG_DATABASE = "test"
TERMINAL = ("completed", "failed", "expired", "cancelled")
TEXTS = [
    "Win a free prize now, click here to claim your reward!",
    "Meeting moved to Thursday; the agenda is attached.",
    "Cheap meds, no prescription, limited offer, act now.",
    "Can you review the patch before the release on Monday?",
]


@functools.cache
def postgres_base_url() -> str:
    """A URL of the local test server, or the reason there is none (then callers skip)."""
    problems = []
    for user in ("postgres", "root"):
        url = f"postgresql+psycopg://{user}@{PG_HOST}/{PG_DATABASE}"
        engine = create_engine(url, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return url
        except SQLAlchemyError as exc:
            problems.append(f"{user}: {str(exc).splitlines()[0]}")
        finally:
            engine.dispose()
    return "unreachable: " + "; ".join(problems)


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A URL whose connections use a fresh schema, dropped afterwards; skips without a server."""
    base = postgres_base_url()
    if base.startswith("unreachable"):
        pytest.skip(f"no PostgreSQL at {PG_HOST}/{PG_DATABASE} ({base})")
    schema = f"linmod_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{base}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def request_line(
    custom_id: str, text: str, url: str = "/v1/moderations", **body: Any
) -> dict[str, Any]:
    """One line of a batch file."""
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"input": text, **body}}


def jsonl(lines: list[Any]) -> bytes:
    """A batch file: dicts as JSON, strings as they are."""
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def parse_lines(content: bytes | str) -> list[dict[str, Any]]:
    """The JSON objects of an output or error file."""
    data = content.decode() if isinstance(content, bytes) else content
    return [json.loads(line) for line in data.splitlines() if line.strip()]


async def upload(
    client: httpx.AsyncClient, content: bytes, *, purpose: str = "batch", **kwargs: Any
) -> httpx.Response:
    """POST /v1/files as the OpenAI client sends it."""
    files = {"file": ("requests.jsonl", content, "application/jsonl")}
    return await client.post("/v1/files", data={"purpose": purpose}, files=files, **kwargs)


async def wait_for(
    client: httpx.AsyncClient,
    batch_id: str,
    statuses: tuple[str, ...] = TERMINAL,
    attempts: int = 1000,
    **kwargs: Any,
) -> dict[str, Any]:
    """Poll a batch every 10 ms until its status is one of `statuses`."""
    for _ in range(attempts):
        batch: dict[str, Any] = (await client.get(f"/v1/batches/{batch_id}", **kwargs)).json()
        if batch["status"] in statuses:
            return batch
        await asyncio.sleep(0.01)
    raise AssertionError(f"batch never reached {statuses}: {batch}")


class JobServer:
    """`python -m service.cli` serving a model and batch jobs, in its own process."""

    def __init__(self, artifact: Path, log: Path, database_url: str, *flags: str) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("LINMOD_")}
        cmd = [
            sys.executable, "-m", "service.cli", "--model-dir", str(artifact),
            "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1], "--device", "cpu",
            "--precision", "fp32", "--intra-op-threads", "1", "--log-format", "json",
            "--database-url", database_url, *flags,
        ]  # fmt: skip
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env
            )
        wait_server_ready(self.proc, self.url, log, timeout=120)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no hand-back, leases left to lapse."""
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        """SIGTERM and wait; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def lines_done(self) -> dict[str, float]:
        """This process's linmod_batch_job_lines_total by outcome."""
        text = httpx.get(f"{self.url}/metrics").text
        return {
            s.labels["outcome"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "linmod_batch_job_lines_total"
        }


def run_to_end(url: str, content: bytes, endpoint: str = "/v1/moderations") -> str:
    """Upload a file and create a batch over plain HTTP; the batch id."""
    with httpx.Client(base_url=url, timeout=120) as client:
        files = {"file": ("requests.jsonl", content, "application/jsonl")}
        uploaded = client.post("/v1/files", data={"purpose": "batch"}, files=files)
        assert uploaded.status_code == 200, uploaded.text
        body = {
            "input_file_id": uploaded.json()["id"],
            "endpoint": endpoint,
            "completion_window": "24h",
        }
        created = client.post("/v1/batches", json=body)
        assert created.status_code == 200, created.text
        batch_id: str = created.json()["id"]
        return batch_id


def poll(
    url: str, batch_id: str, until: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    """GET the batch every 20 ms until `until(batch)` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch: dict[str, Any] = httpx.get(f"{url}/v1/batches/{batch_id}", timeout=30).json()
        if until(batch):
            return batch
        time.sleep(0.02)
    raise AssertionError(f"timed out: {batch}")


def results_of(url: str, batch: dict[str, Any]) -> list[dict[str, Any]]:
    """The output and error lines of a finished batch."""
    lines: list[dict[str, Any]] = []
    for key in ("output_file_id", "error_file_id"):
        if batch[key]:
            response = httpx.get(f"{url}/v1/files/{batch[key]}/content", timeout=120)
            assert response.status_code == 200, response.text
            lines += parse_lines(response.content)
    return lines
