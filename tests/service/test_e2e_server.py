"""The real thing: `python -m service.cli` (uvicorn) serving the tiny exported model over TCP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from service_testing import free_port, wait_server_ready

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
WORDS = [
    "win", "free", "prize", "click", "claim", "reward", "meeting", "agenda", "cheap", "meds",
    "offer", "review", "patch",
]  # fmt: skip


def text_of(n_words: int) -> str:
    return " ".join(WORDS[(i * 7 + n_words) % len(WORDS)] for i in range(n_words))


class Server:
    def __init__(self, artifact: Path, tmp: Path, *flags: str) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = tmp / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LINMOD_")}
        cmd = [
            sys.executable, "-m", "service.cli", "--model-dir", str(artifact),
            "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1], "--device", "cpu",
            "--database-url", f"sqlite:///{tmp / 'jobs.db'}", "--log-format", "json", *flags,
        ]  # fmt: skip
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env
            )
        wait_server_ready(self.proc, self.url, self.log, timeout=60)

    def stop(self) -> bool:
        """SIGTERM, then whether it shut down cleanly (uvicorn re-raises the signal at exit)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        complete = "Application shutdown complete" in self.log.read_text()
        return complete and self.proc.returncode in (0, -signal.SIGTERM)


@pytest.fixture(scope="module")
def server(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tiny_artifact, tmp_path_factory.mktemp("server"), "--precision", "fp32",
                     "--max-wait-ms", "20")  # fmt: skip
    yield running
    assert running.stop(), running.log.read_text()[-3000:]


def test_openai_client_moderations(server: Server) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="not-needed")
    response = client.moderations.create(model="omni-moderation-latest", input="win a free prize")
    assert response.id.startswith("modr-") and len(response.results) == 1
    result = response.results[0].to_dict()
    assert set(result) == {
        "flagged",
        "categories",
        "category_scores",
        "category_applied_input_types",
    }
    many = client.moderations.create(input=["hello", text_of(400)])
    assert len(many.results) == 2


def test_classify_and_headers(server: Server) -> None:
    response = httpx.post(f"{server.url}/v1/classify", json={"input": [text_of(3), text_of(300)]})
    assert response.status_code == 200
    short, long = response.json()["results"]
    assert short["chunks"] == 1 and long["chunks"] > 1
    for header in ("x-request-id", "x-queue-time-ms", "x-inference-time-ms", "x-total-time-ms"):
        assert header in response.headers


def test_bad_input_over_the_wire(server: Server) -> None:
    json_type = {"content-type": "application/json"}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        big = b'{"input": "' + b"a" * (10 * 1024 * 1024) + b'"}'
        cases = [
            (client.post("/v1/classify", content=big, headers=json_type), 413),
            (client.post("/v1/classify", json={"input": ["x"] * 100_000}), 413),
            (client.post("/v1/classify", content=b'{"input": "\xff\xfe"}', headers=json_type), 400),
            (client.post("/v1/classify", content=b'{"input": "a\x00"}', headers=json_type), 400),
            (client.post("/v1/classify", json={"input": "a\u0000"}), 422),
            (
                client.post(
                    "/v1/classify", content=b"input=a", headers={"content-type": "text/plain"}
                ),
                415,
            ),
            (client.post("/v1/classify", json={"input": "a", "unknown": 1}), 422),
            (client.post("/v1/classify", json={"input": []}), 422),
        ]
        for response, status in cases:
            assert response.status_code == status, response.text
            assert set(response.json()["error"]) == {"message", "type", "code"}
        assert client.post("/v1/classify", json={"input": "still serving"}).status_code == 200


def test_a_burst_gets_the_same_answers_as_single_requests(server: Server) -> None:
    texts = [text_of(n) for n in (1, 5, 17, 40, 90, 200, 450)] * 3

    def one(text: str) -> dict[str, object]:
        response = httpx.post(f"{server.url}/v1/classify", json={"input": text}, timeout=30)
        assert response.status_code == 200, response.text
        result: dict[str, object] = response.json()["results"][0]
        return result

    solo = [one(t) for t in texts[:7]]
    with ThreadPoolExecutor(max_workers=12) as pool:
        burst = list(pool.map(one, texts))
    for i, got in enumerate(burst):
        want = solo[i % 7]
        assert got["label"] == want["label"] and got["flagged"] == want["flagged"]
        for label, value in want["scores"].items():  # type: ignore[union-attr]
            assert abs(got["scores"][label] - value) <= 1e-5  # type: ignore[index]


def test_metrics_parse_and_count(server: Server) -> None:
    text = httpx.get(f"{server.url}/metrics").text
    samples = {
        (s.name, json.dumps(s.labels, sort_keys=True)): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    ok = json.dumps({"method": "POST", "route": "/v1/classify", "status": "200"}, sort_keys=True)
    assert samples[("linmod_http_requests_total", ok)] >= 1
    assert samples[("linmod_documents_total", "{}")] >= 1
    info = [k for k in samples if k[0] == "linmod_model_info"]
    assert json.loads(info[0][1])["provider"] == "CPUExecutionProvider"


def test_logs_are_json_lines(server: Server) -> None:
    httpx.post(f"{server.url}/v1/classify", json={"input": "logged"})
    lines = [line for line in server.log.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records and len(records) >= len(lines) - 5  # ORT may print a few raw lines
    access = [r for r in records if r.get("logger") == "linmod.access"]
    assert access and {"request_id", "route", "status", "duration_ms"} <= set(access[-1])


def test_sigterm_drains_and_exits_cleanly(tiny_artifact: Path, tmp_path: Path) -> None:
    server = Server(tiny_artifact, tmp_path, "--precision", "fp32", "--max-wait-ms", "50")
    with ThreadPoolExecutor(max_workers=8) as pool:
        sent = [
            pool.submit(
                httpx.post, f"{server.url}/v1/classify", json={"input": text_of(500)}, timeout=30
            )
            for _ in range(8)
        ]
        time.sleep(0.05)
        assert server.stop(), server.log.read_text()[-3000:]
        for future in sent:
            try:
                response = future.result()
            except httpx.TransportError:
                continue  # sent after the listener closed: refused, never half-answered
            if response.status_code == 503:
                # Arrived once the drain refused new work: a whole, retryable answer.
                assert response.json()["error"]["code"] == "shutting_down", response.text
                continue
            assert response.status_code == 200, response.text


def test_the_service_threads_carry_their_names_in_the_kernel(server: Server) -> None:
    from bench.loadgen import thread_roles_cpu_s

    # Concurrent long texts: tokenized on the tokenizer threads, run on the engine threads,
    # until each kind of thread has used a clock tick of CPU (/proc counts 10 ms ticks).
    body = {"input": text_of(400), "long_document": "chunk"}
    roles: dict[str, float] = {}
    deadline = time.monotonic() + 60
    with ThreadPoolExecutor(4) as pool:
        while time.monotonic() < deadline:
            answers = list(pool.map(lambda _: httpx.post(f"{server.url}/v1/classify", json=body,
                                                         timeout=60), range(4)))  # fmt: skip
            assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
            roles = thread_roles_cpu_s(server.proc.pid)
            if all(roles.get(r, 0.0) > 0 for r in ("linmod-engine", "linmod-tokenize", "loop")):
                break
    assert all(roles.get(r, 0.0) > 0 for r in ("linmod-engine", "linmod-tokenize", "loop")), roles
    tasks = Path(f"/proc/{server.proc.pid}/task")
    names = {(t / "comm").read_text().strip() for t in tasks.iterdir()}
    # what top -H, ps -L and perf show; the kernel keeps 15 bytes of "linmod-tokenize_0"
    assert {"linmod-engine-0", "linmod-engine-1", "linmod-tokenize", "linmod-db_0"} <= names
