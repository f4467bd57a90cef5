"""A real Prometheus scrapes the real service; request rate and latency read back from its API."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from service_testing import free_port

PROMETHEUS = shutil.which("prometheus") or (
    "/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None
)
REPO = Path(__file__).resolve().parents[2]
ROUTE = "/v1/classify"
WINDOW = "15s"
START_TIMEOUT_S = 30.0
QUERY_TIMEOUT_S = 30.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="prometheus binary not found (Debian package `prometheus`; .ci/run installs it)",
    ),
]

TEXTS = [
    "Win a free prize now, click here to claim your reward!",
    "Meeting moved to Thursday; the agenda is attached.",
    "Cheap meds, no prescription, limited offer, act now. " * 20,
    "Can you review the patch before the release on Monday?",
]


def log_tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def wait_until(
    check: Callable[[], bool], timeout: float, proc: subprocess.Popen[bytes], log: Path, what: str
) -> None:
    """Poll `check` until true; fail early if the process died, with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log_tail(log)}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{what} not up after {timeout:.0f} s:\n{log_tail(log)}")


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def service_url(tiny_artifact: Path, tmp_path: Path) -> Iterator[str]:
    """The real service (uvicorn via `python -m service.cli`) on the CPU, on a free port."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINMOD_")}
    env["ORT_DISABLE_TELEMETRY"] = "1"
    cmd = [
        sys.executable, "-m", "service.cli",
        "--model-dir", str(tiny_artifact),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--device", "cpu",
        "--database-url", f"sqlite:///{tmp_path / 'jobs.db'}",
        "--log-format", "json",
    ]  # fmt: skip
    log = tmp_path / "service.log"
    proc = start(cmd, log, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: httpx.get(f"{url}/ready", timeout=2).status_code == 200,
            START_TIMEOUT_S, proc, log, "the service",
        )  # fmt: skip
        yield url
    finally:
        stop(proc)


@pytest.fixture
def prometheus_url(service_url: str, tmp_path: Path) -> Iterator[str]:
    """A real Prometheus scraping the service every second, with its own temporary storage."""
    assert PROMETHEUS is not None
    target = service_url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: linmod\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    port = free_port()
    cmd = [
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    log = tmp_path / "prometheus.log"
    proc = start(cmd, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200,
            START_TIMEOUT_S, proc, log, "prometheus",
        )  # fmt: skip
        yield url
    finally:
        stop(proc)


def query(prometheus_url: str, promql: str) -> list[dict[str, object]]:
    """The result vector of an instant query through Prometheus' HTTP API."""
    response = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": promql}, timeout=5)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    result: list[dict[str, object]] = body["data"]["result"]
    return result


def scalar(prometheus_url: str, promql: str) -> float | None:
    """The single value of a query, or None while Prometheus has no sample for it."""
    result = query(prometheus_url, promql)
    if not result:
        return None
    value = result[0]["value"]
    assert isinstance(value, list)
    return float(value[1])


def send_traffic(client: httpx.Client, log: Path) -> int:
    """One round of single and list classifications; the service's log on any failure."""
    bodies = [{"input": text} for text in TEXTS] + [{"input": TEXTS}]
    for body in bodies:
        try:
            response = client.post(ROUTE, json=body)
        except httpx.HTTPError as exc:
            pytest.fail(f"POST {ROUTE} failed: {exc!r}\n{log_tail(log)}")
        assert response.status_code == 200, f"{response.text}\n{log_tail(log)}"
    return len(bodies)


def test_prometheus_reads_request_rate_and_latency(
    service_url: str, prometheus_url: str, tmp_path: Path
) -> None:
    rate_q = f'sum(rate(linmod_http_requests_total{{route="{ROUTE}",status="200"}}[{WINDOW}]))'
    p99_q = (
        "histogram_quantile(0.99, sum by (le) "
        f'(rate(linmod_http_request_duration_seconds_bucket{{route="{ROUTE}"}}[{WINDOW}])))'
    )
    rate = p99 = None
    sent = 0
    deadline = time.monotonic() + QUERY_TIMEOUT_S
    with httpx.Client(base_url=service_url, timeout=10) as client:
        # Traffic keeps flowing while we poll: rate() needs two scrapes that saw it grow.
        while time.monotonic() < deadline:
            sent += send_traffic(client, tmp_path / "service.log")
            rate = scalar(prometheus_url, rate_q)
            p99 = scalar(prometheus_url, p99_q)
            if rate and p99 and math.isfinite(rate) and math.isfinite(p99):
                break
            time.sleep(0.25)

    up = query(prometheus_url, 'up{job="linmod"}')
    assert up and float(up[0]["value"][1]) == 1.0, f"target not up: {up}"  # type: ignore[index]
    assert rate is not None and math.isfinite(rate) and rate > 0, f"request rate {rate}"
    assert p99 is not None and math.isfinite(p99) and p99 > 0, f"p99 latency {p99}"
    # A quantile of this histogram is bounded by its largest finite bucket (seconds).
    assert p99 <= 60.0
    assert sent > 0

    # Model info is scraped with the provider actually in use.
    info = query(prometheus_url, "linmod_model_info")
    assert info, "linmod_model_info not scraped"
    labels = info[0]["metric"]
    assert isinstance(labels, dict)
    assert labels.get("provider") == "CPUExecutionProvider"
