"""bench.answer_cost: its stub servers answer with the shapes they stand for, on time, and a
short run reports every stub."""

from __future__ import annotations

import csv
import itertools
import sys
import time
from pathlib import Path

import httpx
import pytest

from bench import answer_cost
from bench.loadgen import ServerProcess, free_port

pytestmark = pytest.mark.slow


def stub(
    tmp_path: Path, answer: str, arrival: str, mean_ms: float, burst_ms: float
) -> ServerProcess:
    port = free_port()
    cmd = [
        sys.executable, "-m", "bench.answer_cost", "serve", answer, arrival, str(port),
        str(mean_ms), str(burst_ms),
    ]  # fmt: skip
    return ServerProcess(cmd, f"http://127.0.0.1:{port}", tmp_path / "stub.log", ready_path="/")


@pytest.mark.parametrize("answer", list(answer_cost.ANSWERS))
def test_a_stub_answers_with_its_servers_headers_and_body(tmp_path: Path, answer: str) -> None:
    server = stub(tmp_path, answer, "one at a time", 0, 20)
    try:
        response = httpx.post(f"{server.url}/v1/classify", json={"input": "hello"})
    finally:
        server.stop()
    headers, body = answer_cost.ANSWERS[answer]
    assert response.status_code == 200
    assert response.content == body
    assert len(response.headers) == len(headers) + 3  # content-length, date, server
    assert response.headers["content-length"] == str(len(body))


def test_answers_in_bursts_leave_on_the_clocks_ticks(tmp_path: Path) -> None:
    # With no delay, every answer waits for the next 300 ms tick of the stub's loop clock, which
    # is time.monotonic() here too: each comes just after a multiple of 0.3 s.
    tick = 0.3
    server = stub(tmp_path, "naive server's", "in bursts", 0, 1000 * tick)
    try:
        with httpx.Client(base_url=server.url) as client:
            ended = []
            for _ in range(4):
                assert client.post("/v1/classify", json={"input": "x"}).status_code == 200
                ended.append(time.monotonic())
    finally:
        server.stop()
    assert all(t % tick < 0.15 for t in ended), [round(t % tick, 3) for t in ended]
    # One tick apart: a request sent just after a tick waits for the next one.
    gaps = [b - a for a, b in itertools.pairwise(ended)]
    assert all(tick - 0.15 < g < tick + 0.15 for g in gaps), gaps


def test_a_short_run_reports_every_stub(tmp_path: Path) -> None:
    argv = ["--requests", "24", "--clients", "4", "--repeats", "2", "--mean-ms", "5"]
    assert answer_cost.main([*argv, "--out", str(tmp_path)]) == 0
    with (tmp_path / "answer-cost.csv").open() as f:
        rows = list(csv.DictReader(f))
    stubs = {(r["answer"], r["arrival"]) for r in rows}
    assert stubs == {(a, b) for a in answer_cost.ANSWERS for b in answer_cost.ARRIVALS}
    for row in rows:
        assert float(row["answers_per_s"]) > 0 and float(row["client_cpu_ms_per_answer"]) > 0
        assert row["turns"] == "2"
    fragment = (tmp_path / "answer-cost.md").read_text()
    assert "python -m bench.answer_cost --requests 24" in fragment
