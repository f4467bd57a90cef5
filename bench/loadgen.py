"""A closed-loop HTTP load generator (asyncio transports + httptools), a server process that is
started and awaited on /ready, Prometheus counters scraped over HTTP, and the batch-jobs client
calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httptools
import httpx

from bench.common import BENCH_DIR, percentile


@dataclass
class LevelResult:
    """What `clients` concurrent clients got, each sending its next request when answered."""

    clients: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # successful requests, seconds
    statuses: dict[int, int] = field(default_factory=dict)  # 0: no response (connection, timeout)
    client_cpu_s: float = 0.0

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def throttled(self) -> int:
        return self.statuses.get(429, 0)

    @property
    def errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s not in (200, 429))

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def ms(self, q: float) -> float:
        return 1000 * percentile(self.latencies, q)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Connection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection: a request is written whole, and the answer's status
    comes back through `waiter` once httptools (uvicorn's parser) has read the whole message."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[int] | None = None
        self.open = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)
            if self.transport is not None:
                self.transport.close()

    def on_message_complete(self) -> None:  # httptools' callback
        self.open = self.open and self.parser.should_keep_alive()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self._fail(exc or ConnectionResetError("the server closed the connection"))

    def _fail(self, exc: Exception) -> None:
        self.open = False
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionError(str(exc)))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _requests(url: str, path: str, bodies: Sequence[bytes]) -> list[bytes]:
    host = urlsplit(url).netloc
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    return [f"{head}Content-Length: {len(b)}\r\n\r\n".encode() + b for b in bodies]


async def run_level(
    url: str,
    texts: Sequence[str],
    clients: int,
    *,
    path: str = "/v1/classify",
    extra: dict[str, Any] | None = None,
    timeout: float = 120.0,
) -> LevelResult:
    """Send every text once, from `clients` concurrent clients, and time each answer.

    The client shares the machine with the server it measures, so it is kept lean, as wrk is:
    each client keeps one connection open and writes each request, head and body serialized
    before the clock starts, in one call, and httptools (the parser uvicorn serves with) reads
    the answer's status without building a response object. That costs about 0.27 ms of CPU
    per answer of the service's, where aiohttp cost 0.70 (`python -m bench.answer_cost`). A
    connection the server closes, or that fails, is opened again for the next request; a
    failed request counts as status 0.
    """
    result = LevelResult(clients)
    split = urlsplit(url)
    host, port = split.hostname or "127.0.0.1", split.port or 80
    bodies = [json.dumps({"input": text, **(extra or {})}).encode() for text in texts]
    requests = _requests(url, path, bodies)
    pending = iter(range(len(requests)))  # shared: each client takes the next text
    loop = asyncio.get_running_loop()

    async def client_loop() -> None:
        conn: _Connection | None = None
        for i in pending:
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(timeout):
                    if conn is None or not conn.open:
                        _, conn = await loop.create_connection(_Connection, host, port)
                    conn.waiter = loop.create_future()
                    assert conn.transport is not None
                    conn.transport.write(requests[i])
                    status = await conn.waiter
            except (OSError, TimeoutError):  # ConnectionError is an OSError
                status = 0
                if conn is not None:
                    conn.close()
                    conn = None
            if status == 200:
                result.latencies.append(time.perf_counter() - t0)
            result.statuses[status] = result.statuses.get(status, 0) + 1
        if conn is not None:
            conn.close()

    cpu0, t0 = _cpu_s(), time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    result.seconds = time.perf_counter() - t0
    result.client_cpu_s = _cpu_s() - cpu0
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a live process and every live descendant, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        stack += children.get(current, [])
    return total


def thread_roles_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of a live process's threads by role, from /proc: "loop" for
    its main thread, else each thread's kernel name less a trailing number ("linmod-engine-1"
    and "linmod-engine-0" are "linmod-engine"); threads named as the process itself are "other".
    The service names its threads (service/threadnames.py); other servers' come out as "other"."""
    ticks = os.sysconf("SC_CLK_TCK")
    roles: dict[str, float] = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        process = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return roles
    for tid in tasks:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue  # ended since the listing
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        role = "loop" if int(tid) == pid else name.rstrip("0123456789").rstrip("-_")
        role = "other" if role == process and int(tid) != pid else role
        roles[role] = roles.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return roles


class ServerProcess:
    """A server started as a subprocess, ready once GET `ready_path` answers 200; SIGTERM to
    stop."""

    def __init__(
        self,
        cmd: list[str],
        url: str,
        log: Path,
        ready_timeout: float = 300.0,
        ready_path: str = "/ready",
        cwd: Path | None = None,
        extra_env: dict[str, str] | None = None,
    ):
        self.cmd, self.url, self.log = cmd, url, log
        env = {k: v for k, v in os.environ.items() if not k.startswith("LINMOD_")}
        env.update(extra_env or {})
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd or BENCH_DIR.parent,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{url}{ready_path}", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {ready_timeout:.0f} s:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def cpu_s(self) -> float:
        """CPU seconds the server's process tree has used so far."""
        return process_tree_cpu_s(self.proc.pid)

    def thread_cpu_s(self) -> dict[str, float]:
        """CPU seconds the server's main process has used so far, by thread role."""
        return thread_roles_cpu_s(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):  # helpers a server started (Ray's) go with it
            os.killpg(self.proc.pid, signal.SIGKILL)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def service_command(model_dir: Path, port: int, precision: str, db: Path, *flags: str) -> list[str]:
    """`linmod-serve` from this environment (or `python -m service.cli` where it is absent)."""
    script = Path(sys.executable).parent / "linmod-serve"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]
    return [
        *head,
        "--model-dir",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--precision",
        precision,
        "--database-url",
        f"sqlite:///{db}",
        "--log-level",
        "warning",
        *flags,
    ]


def naive_command(model_dir: Path, port: int, precision: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.naive_server",
        "--model-dir",
        str(model_dir),
        "--port",
        str(port),
        "--precision",
        precision,
    ]


def counters(url: str) -> dict[str, float]:
    """Every sample of /metrics by name, summed over labels, and by `name{label=value}`."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            keys = [sample.name] + [f"{sample.name}{{{k}={v}}}" for k, v in sample.labels.items()]
            for key in keys:
                out[key] = out.get(key, 0.0) + float(sample.value)
    return out


def server_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What the service's own metrics say about the engine runs between two scrapes."""

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    runs = delta("linmod_batch_size_count")
    waits = delta("linmod_queue_wait_seconds_count{priority=interactive}")
    return {
        "real_over_padded": ratio(
            delta("linmod_tokens_total"), delta("linmod_padded_tokens_total")
        ),
        "windows_per_run": ratio(delta("linmod_batch_size_sum"), runs),
        "engine_run_ms": 1000 * ratio(delta("linmod_inference_duration_seconds_sum"), runs),
        "queue_wait_ms": 1000
        * ratio(delta("linmod_queue_wait_seconds_sum{priority=interactive}"), waits),
    }


# ------------------------------------------------------------------------------ batch jobs


def has_batches(url: str) -> bool:
    paths = httpx.get(f"{url}/openapi.json", timeout=30).json().get("paths", {})
    return "/v1/batches" in paths and "/v1/files" in paths


def batch_file(texts: Sequence[str], lines: int, extra: dict[str, Any]) -> bytes:
    """A JSONL batch input of `lines` classify requests, cycling through `texts`."""
    rows = (
        json.dumps(
            {
                "custom_id": f"req-{i}",
                "method": "POST",
                "url": "/v1/classify",
                "body": {"input": texts[i % len(texts)], **extra},
            }
        )
        for i in range(lines)
    )
    return ("\n".join(rows) + "\n").encode()


def start_batch(url: str, content: bytes) -> str:
    """Upload the file and create a batch over it; the batch id."""
    with httpx.Client(base_url=url, timeout=300) as client:
        up = client.post(
            "/v1/files",
            files={"file": ("bench.jsonl", content, "application/jsonl")},
            data={"purpose": "batch"},
        )
        up.raise_for_status()
        created = client.post(
            "/v1/batches",
            json={
                "input_file_id": up.json()["id"],
                "endpoint": "/v1/classify",
                "completion_window": "24h",
            },
        )
        created.raise_for_status()
        return str(created.json()["id"])


def batch_status(url: str, batch_id: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/v1/batches/{batch_id}", timeout=30)
    response.raise_for_status()
    return dict(response.json())


def wait_batch(url: str, batch_id: str, until: Sequence[str], timeout: float) -> dict[str, Any]:
    """Poll until the batch reaches one of `until` statuses (or `timeout` passes)."""
    deadline = time.monotonic() + timeout
    while True:
        status = batch_status(url, batch_id)
        done = status["request_counts"]["completed"] + status["request_counts"]["failed"]
        if status["status"] in until and (status["status"] != "in_progress" or done > 0):
            return status
        if time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def cancel_batch(url: str, batch_id: str) -> None:
    httpx.post(f"{url}/v1/batches/{batch_id}/cancel", timeout=30)


def batching_policy(url: str) -> dict[str, Any]:
    """The batching policy the service chose at warm-up, from /info."""
    info = httpx.get(f"{url}/info", timeout=30).json()
    return dict((info.get("batching") or {}).get("policy") or {})
