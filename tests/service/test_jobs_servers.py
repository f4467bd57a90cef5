"""Batch jobs on real server processes serving the tiny exported model: a replica killed with
SIGKILL mid-batch and started again, and two replicas finishing one batch on PostgreSQL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from jobs_testing import (
    TERMINAL,
    TEXTS,
    JobServer,
    jsonl,
    parse_lines,
    poll,
    postgres_schema,
    request_line,
    results_of,
    run_to_end,
)
from sqlalchemy import create_engine, text

pytestmark = pytest.mark.slow

# Short leases so a dead replica's lines are taken over within seconds.
FLAGS = ("--job-lease-s", "3", "--job-poll-s", "0.05", "--job-claim-lines", "16",
         "--max-wait-ms", "5")  # fmt: skip


def batch_file(n: int) -> tuple[bytes, list[str], int]:
    """n requests with unique custom_ids, texts of many lengths (the longest chunked); some
    refused by the endpoint (an empty input: 422) or the batch (a wrong url). Also returns
    how many should fail."""
    lines, failing = [], 0
    for i in range(n):
        custom_id = f"req-{i:05d}"
        if i % 97 == 13:
            lines.append(request_line(custom_id, ""))
            failing += 1
        elif i % 101 == 7:
            lines.append(request_line(custom_id, "to the wrong endpoint", url="/v1/classify"))
            failing += 1
        else:
            words = " ".join(TEXTS[(i + k) % 4] for k in range(1 + i % 13))
            lines.append(request_line(custom_id, words))
    return jsonl(lines), [f"req-{i:05d}" for i in range(n)], failing


def assert_exactly_once(lines: list[dict[str, Any]], ids: list[str]) -> None:
    seen = Counter(line["custom_id"] for line in lines)
    assert set(seen) == set(ids), set(ids) ^ set(seen)
    assert max(seen.values()) == 1, [k for k, v in seen.items() if v > 1][:5]


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
        return
    with postgres_schema() as url:
        yield url


def line_states(url: str, batch_id: str) -> dict[str, int]:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT state, count(*) FROM linmod_batch_lines WHERE batch_id = :b GROUP BY state"
            ),
            {"b": batch_id},
        ).all()
        retried = conn.execute(
            text("SELECT count(*) FROM linmod_batch_lines WHERE batch_id = :b AND attempts = 2"),
            {"b": batch_id},
        ).scalar()
    engine.dispose()
    return {state: int(n) for state, n in rows} | {"claimed twice": int(retried or 0)}


def kill_while_holding_lines(server: JobServer, url: str, batch_id: str) -> dict[str, int]:
    """SIGKILL the replica at a moment it holds claimed lines, and return the lines' states then.

    The replica is frozen (SIGSTOP) before its lines are read; between claims it may hold none,
    and then it runs on a moment and is tried again. What it held is read again once it is dead:
    frozen in the middle of a SQLite commit, its last transaction is in the write-ahead log but
    not yet visible to readers, and the next connection after its death recovers it.
    """
    for _ in range(500):
        os.kill(server.proc.pid, signal.SIGSTOP)
        held = line_states(url, batch_id)
        if held.get("claimed", 0) > 0 and held.get("pending", 0) > 0:
            server.kill()
            return line_states(url, batch_id)
        os.kill(server.proc.pid, signal.SIGCONT)
        time.sleep(0.01)
    server.kill()
    raise AssertionError(f"the replica never held claimed lines beside pending ones: {held}")


def test_a_replica_killed_mid_batch_is_taken_over(
    tiny_artifact: Path, tmp_path: Path, database_url: str
) -> None:
    url = database_url
    content, ids, failing = batch_file(3000)
    first = JobServer(tiny_artifact, tmp_path / "first.log", url, *FLAGS)
    batch_id = run_to_end(first.url, content)
    running = poll(
        first.url, batch_id,
        lambda b: b["status"] != "validating" and b["request_counts"]["completed"] >= 300,
        timeout=300,
    )  # fmt: skip
    assert running["status"] == "in_progress", "the batch ended before the kill; make it larger"
    held = kill_while_holding_lines(first, url, batch_id)

    restarted = time.monotonic()
    second = JobServer(tiny_artifact, tmp_path / "second.log", url, *FLAGS)
    ready_s = time.monotonic() - restarted
    batch = poll(second.url, batch_id, lambda b: b["status"] in TERMINAL, timeout=600)
    finished_s = time.monotonic() - restarted
    try:
        assert batch["status"] == "completed", batch
        counts = batch["request_counts"]
        assert counts == {"total": 3000, "completed": 3000 - failing, "failed": failing}
        lines = results_of(second.url, batch)
        assert len(lines) == 3000
        assert_exactly_once(lines, ids)
        # Exactly the lines the killed replica held were claimed a second time.
        assert line_states(url, batch_id)["claimed twice"] == held["claimed"]
        print(
            f"\nkilled at {running['request_counts']}, lines held by the dead replica: {held}; "
            f"restarted replica ready in {ready_s:.1f} s, batch completed {finished_s:.1f} s "
            f"after the restart; {counts}; {len(lines)} result lines, each custom_id once"
        )
    finally:
        second.stop()


def test_two_replicas_share_a_batch_on_postgresql(tiny_artifact: Path, tmp_path: Path) -> None:
    with postgres_schema() as url:
        content, ids, failing = batch_file(5000)
        a = JobServer(tiny_artifact, tmp_path / "a.log", url, *FLAGS)
        b = JobServer(tiny_artifact, tmp_path / "b.log", url, *FLAGS)
        try:
            started = time.monotonic()
            client_a = openai.OpenAI(base_url=f"{a.url}/v1", api_key="unused", max_retries=0)
            client_b = openai.OpenAI(base_url=f"{b.url}/v1", api_key="unused", max_retries=0)
            file = client_a.files.create(file=("mail.jsonl", content), purpose="batch")
            created = client_b.batches.create(
                input_file_id=file.id, endpoint="/v1/moderations", completion_window="24h"
            )
            batch = poll(a.url, created.id, lambda x: x["status"] in TERMINAL, timeout=900)
            took = time.monotonic() - started
            assert batch["status"] == "completed", batch
            assert batch["request_counts"] == {
                "total": 5000, "completed": 5000 - failing, "failed": failing,
            }  # fmt: skip
            lines = results_of(b.url, batch)
            assert len(lines) == 5000
            assert_exactly_once(lines, ids)
            output = parse_lines(client_b.files.content(batch["output_file_id"]).content)
            assert len(output) == 5000 - failing

            # Both replicas did part of the work, and no line was counted twice.
            done = [sum(server.lines_done().values()) for server in (a, b)]
            assert all(n > 0 for n in done) and sum(done) == 5000, done
            engine = create_engine(url)
            with engine.connect() as conn:
                workers = dict(
                    conn.execute(
                        text(
                            "SELECT worker, count(*) FROM linmod_batch_lines "
                            "WHERE batch_id = :b AND worker IS NOT NULL GROUP BY worker"
                        ),
                        {"b": batch["id"]},
                    ).all()
                )
                files = conn.execute(
                    text("SELECT count(*) FROM linmod_files WHERE batch_id = :b"),
                    {"b": batch["id"]},
                ).scalar()
            engine.dispose()
            assert len(workers) == 2 and files == 2, (workers, files)  # finalized once

            assert client_a.batches.retrieve(batch["id"]).status == "completed"
            assert [x.id for x in client_b.batches.list(limit=10)] == [batch["id"]]
            with pytest.raises(openai.ConflictError):
                client_a.batches.cancel(batch["id"])
            print(
                f"\n5000 lines over two replicas in {took:.1f} s: lines written per replica "
                f"{done}, per worker id {sorted(workers.values())}; {batch['request_counts']}; "
                f"output and error files made once ({files})"
            )
        finally:
            a.stop()
            b.stop()


def test_the_linmod_batch_command(tiny_artifact: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    server = JobServer(tiny_artifact, tmp_path / "server.log", url, *FLAGS, "--api-keys", "k1")
    content, ids, failing = batch_file(400)
    source = tmp_path / "mail.jsonl"
    source.write_bytes(content)
    command = [sys.executable, "-m", "service.jobs.client", str(source), "--url", server.url,
               "--poll-s", "0.1", "--metadata", "team=mail"]  # fmt: skip
    try:
        refused = subprocess.run([*command, "--api-key", "wrong"], capture_output=True, text=True)
        assert refused.returncode == 2 and "401" in refused.stderr, refused.stderr
        done = subprocess.run([*command, "--api-key", "k1"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert f"completed: {400 - failing} completed, {failing} failed of 400" in done.stdout
        assert "400/400" in done.stderr  # the progress bar's last state
        lines = parse_lines((tmp_path / "mail.output.jsonl").read_bytes())
        lines += parse_lines((tmp_path / "mail.errors.jsonl").read_bytes())
        assert_exactly_once(lines, ids)

        # Interrupted while the batch runs, the command cancels it. The batch is big enough
        # (half a minute or more for the tiny model) that it cannot finish first.
        source.write_bytes(batch_file(30000)[0])
        env = {**os.environ, "LINMOD_API_KEY": "k1"}
        # Output to a file, not a pipe: a progress bar nobody reads would fill a pipe and block.
        log = tmp_path / "client.log"
        # A shell starts background jobs with SIGINT ignored, and Python keeps it ignored; the
        # command gets the default disposition back, as it has when started from a terminal.
        with log.open("wb") as out:
            running = subprocess.Popen(
                command,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
        key = {"authorization": "Bearer k1"}
        batch = None
        deadline = time.monotonic() + 60
        while batch is None and time.monotonic() < deadline:
            listed = httpx.get(f"{server.url}/v1/batches", headers=key).json()["data"]
            batch = next((b for b in listed if b["status"] == "in_progress"), None)
            time.sleep(0.02)
        assert batch is not None
        running.send_signal(signal.SIGINT)
        assert running.wait(timeout=30) == 130, log.read_text(errors="replace")[-2000:]
        assert f"cancelling {batch['id']}" in log.read_text(errors="replace")
        ended = httpx.get(f"{server.url}/v1/batches/{batch['id']}", headers=key).json()
        assert ended["status"] in ("cancelling", "cancelled"), ended
    finally:
        server.stop()
