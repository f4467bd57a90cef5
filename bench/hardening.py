"""The service under hostile use, on a real server with the shipped model:

- `hol`: a small client's latency, idle and while 20 clients send 4 MB requests (their statuses);
- `download`: how much a 100 MB output file download raises the server's peak RSS;
- `poison`: a clean batch's time alone and beside another key's batch with a poisoned line.

    python -m bench.hardening [--part hol|download|poison|all] [--quick]

Prints a table per part and writes results/hardening.md.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench.common import base_parser, command_line, machine, machine_line, out_dir, percentile

KEYS = ("key-a", "key-b")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server(model_dir: Path, db: Path, *flags: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`linmod-serve` on CPU with two API keys (from the environment) and a SQLite job store."""
    url = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINMOD_")}
    env["LINMOD_API_KEYS"] = ",".join(KEYS)
    cmd = [sys.executable, "-m", "service.cli", "--model-dir", str(model_dir), "--host",
           "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--device", "cpu", "--log-level",
           "warning", "--database-url", f"sqlite:///{db}", "--job-poll-s", "0.05", *flags]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError("the server did not become ready")
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def auth(key: str = KEYS[0]) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


# -- head-of-line blocking ----------------------------------------------------------------------


def small_latencies(url: str, n: int) -> tuple[list[float], Counter[int]]:
    times, statuses = [], Counter[int]()
    with httpx.Client(base_url=url, headers=auth(), timeout=60) as http:
        for i in range(n):
            start = time.perf_counter()
            r = http.post("/v1/moderations", json={"input": f"Lunch at noon? Message {i}."})
            times.append(time.perf_counter() - start)
            statuses[r.status_code] += 1
    return times, statuses


def attack(url: str, clients: int, seconds: float, out: Any) -> None:
    """`clients` threads each sending ~4 MB classify requests back to back for `seconds`; puts
    their outcome counts on `out`. Runs in its own process, so the attackers' client work does
    not hold the GIL of the process that times the small client."""
    body = json.dumps({"input": ["Win a free prize now! " * 11_300] * 16}).encode()
    large: Counter[str] = Counter()
    stop = time.monotonic() + seconds

    def attacker() -> None:
        with httpx.Client(base_url=url, headers=auth(KEYS[1]), timeout=120) as http:
            while time.monotonic() < stop:
                try:
                    r = http.post(
                        "/v1/classify", content=body, headers={"content-type": "application/json"}
                    )
                    large[str(r.status_code)] += 1
                except httpx.TimeoutException:
                    large["timeout"] += 1
                except httpx.HTTPError as exc:
                    large[type(exc).__name__] += 1

    threads = [threading.Thread(target=attacker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put((len(body), dict(large)))


def hol(model_dir: Path, n: int) -> list[list[Any]]:
    import multiprocessing

    with tempfile.TemporaryDirectory() as tmp, server(model_dir, Path(tmp) / "jobs.db") as (url, _):
        small_latencies(url, 20)  # warm the connection and caches
        start = time.monotonic()
        idle, _ = small_latencies(url, n)
        seconds = 2 * (time.monotonic() - start) + 5  # outlasts the loaded run
        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        attackers = ctx.Process(target=attack, args=(url, 20, seconds, results))
        attackers.start()
        time.sleep(2)  # the attack is under way (the process started, the clients connected)
        loaded, small_statuses = small_latencies(url, n)
        size, large = results.get(timeout=seconds + 120)
        attackers.join()
    p99_idle, p99_loaded = percentile(idle, 99) * 1000, percentile(loaded, 99) * 1000
    return [
        ["small client p50 idle / under attack (ms)",
         f"{percentile(idle, 50) * 1000:.1f} / {percentile(loaded, 50) * 1000:.1f}"],
        ["small client p99 idle / under attack (ms)", f"{p99_idle:.1f} / {p99_loaded:.1f}"],
        ["p99 ratio (target <= 3x)", f"{p99_loaded / p99_idle:.2f}x"],
        ["small client statuses under attack", dict(small_statuses)],
        [f"4 MB requests ({size} bytes), 20 clients in another process: statuses", large],
    ]  # fmt: skip


# -- download memory ----------------------------------------------------------------------------


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def fill_output_file(db: Path, size: int, line_bytes: int) -> str:
    """A completed batch whose output file holds `size` bytes, written straight to the store."""
    from sqlalchemy import create_engine, insert

    from service.auth import key_id
    from service.jobs.db import batch_lines, batches, files

    engine = create_engine(f"sqlite:///{db}")
    owner, now, n = key_id(KEYS[0]), time.time(), size // line_bytes
    line = json.dumps({"custom_id": "x", "response": {"body": "y" * (line_bytes - 60)}})[
        : line_bytes - 1
    ]
    with engine.begin() as conn:
        conn.execute(insert(batches).values(
            id="batch_bench", owner=owner, endpoint="/v1/moderations", input_file_id="file-in",
            completion_window="24h", model="m", status="completed", total=n, completed=n,
            failed=0, output_file_id="file-out", created_at=now, expires_at=now + 86400,
        ))  # fmt: skip
        for start in range(0, n, 500):
            conn.execute(insert(batch_lines), [
                {"batch_id": "batch_bench", "line_no": i + 1, "custom_id": f"r{i}",
                 "state": "done", "attempts": 1, "outcome": "succeeded", "result": line,
                 "result_bytes": len(line) + 1}
                for i in range(start, min(n, start + 500))
            ])  # fmt: skip
        conn.execute(insert(files).values(
            id="file-out", owner=owner, purpose="batch_output", kind="output",
            filename="batch_bench_output.jsonl", bytes=n * (len(line) + 1), lines=n,
            status="processed", batch_id="batch_bench", created_at=now, expires_at=now + 86400,
        ))  # fmt: skip
    engine.dispose()
    return "file-out"


def download(model_dir: Path, size: int) -> list[list[Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "jobs.db"
        with server(model_dir, db) as (url, proc):
            file_id = fill_output_file(db, size, 50_000)
            httpx.get(f"{url}/v1/files/{file_id}", headers=auth())  # store opened and warm
            time.sleep(1)
            rss0, hwm0 = rss_kib(proc.pid)
            peak_rss, received = rss0, 0
            start = time.perf_counter()
            with httpx.stream(
                "GET", f"{url}/v1/files/{file_id}/content", headers=auth(), timeout=300
            ) as r:
                for chunk in r.iter_bytes():
                    received += len(chunk)
                    peak_rss = max(peak_rss, rss_kib(proc.pid)[0])
            seconds = time.perf_counter() - start
            _, hwm1 = rss_kib(proc.pid)
        rows += [
            ["output file downloaded (MB)", f"{received / 1e6:.1f} in {seconds:.1f} s"],
            ["server RSS before / highest sampled during (MiB)",
             f"{rss0 / 1024:.1f} / {peak_rss / 1024:.1f}"],
            ["rise of sampled RSS (MiB, target < 20)", f"{(peak_rss - rss0) / 1024:.1f}"],
            ["server peak RSS (VmHWM) before / after (MiB)", f"{hwm0 / 1024:.1f} / {hwm1 / 1024:.1f}"],
            ["rise of peak RSS (MiB, target < 20)", f"{(hwm1 - hwm0) / 1024:.1f}"],
        ]  # fmt: skip
    return rows


# -- poisoned batch -----------------------------------------------------------------------------


def batch_lines_of(n: int, prefix: str) -> list[dict[str, Any]]:
    texts = ["Win a free prize now, click here!", "Meeting moved to Thursday; agenda attached."]
    return [
        {"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/moderations",
         "body": {"input": texts[i % 2] * (1 + i % 5)}}
        for i in range(n)
    ]  # fmt: skip


def run_batch(url: str, key: str, lines: list[Any]) -> tuple[str, float]:
    """Upload and create a batch; (batch id, seconds until it ended)."""
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    with httpx.Client(base_url=url, headers=auth(key), timeout=60) as http:
        start = time.perf_counter()
        up = http.post("/v1/files", data={"purpose": "batch"}, files={"file": ("b.jsonl", content)})
        body = {
            "input_file_id": up.json()["id"],
            "endpoint": "/v1/moderations",
            "completion_window": "24h",
        }
        batch_id = http.post("/v1/batches", json=body).json()["id"]
        while http.get(f"/v1/batches/{batch_id}").json()["status"] not in ("completed", "failed"):
            time.sleep(0.05)
        return batch_id, time.perf_counter() - start


def beside(url: str, other: list[Any], n: int, prefix: str) -> tuple[float, str]:
    """Seconds a clean n-line batch (KEYS[1]) takes while `other` runs as KEYS[0]'s batch;
    and the other batch's id."""
    results: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: results.update(other=run_batch(url, KEYS[0], other)))
    thread.start()
    time.sleep(0.2)
    _, seconds = run_batch(url, KEYS[1], batch_lines_of(n, prefix))
    thread.join()
    return seconds, results["other"][0]


def poison(model_dir: Path, n: int, repeats: int = 3) -> list[list[Any]]:
    """A clean batch alone, beside another key's clean batch of the same size (the engine is
    shared: the control), beside the same batch with one poisoned line, and beside a batch of
    the poisoned line alone; medians of `repeats` turns."""

    def poisoned(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        lines[len(lines) // 2]["custom_id"] = "\ud800"  # a lone surrogate: once, stuck validating
        return lines

    times: dict[str, list[float]] = {k: [] for k in ("alone", "control", "poisoned", "only")}
    with tempfile.TemporaryDirectory() as tmp, server(model_dir, Path(tmp) / "jobs.db") as (url, _):
        for turn in range(repeats):
            times["alone"].append(run_batch(url, KEYS[1], batch_lines_of(n, f"a{turn}"))[1])
            times["control"].append(beside(url, batch_lines_of(n, f"o{turn}"), n, f"c{turn}")[0])
            seconds, bad_id = beside(url, poisoned(batch_lines_of(n, f"p{turn}")), n, f"d{turn}")
            times["poisoned"].append(seconds)
            times["only"].append(
                beside(url, poisoned(batch_lines_of(1, f"q{turn}")), n, f"e{turn}")[0]
            )
        with httpx.Client(base_url=url, headers=auth(KEYS[0]), timeout=60) as http:
            batch = http.get(f"/v1/batches/{bad_id}").json()
            errors = http.get(f"/v1/files/{batch['error_file_id']}/content").text.splitlines()
    med = {k: statistics.median(v) for k, v in times.items()}
    return [
        [f"clean batch of {n} lines alone (s, median of {repeats})", f"{med['alone']:.2f}"],
        [f"... beside another key's clean batch of {n} lines (control)", f"{med['control']:.2f}"],
        [f"... beside another key's {n}-line batch with one poisoned line",
         f"{med['poisoned']:.2f} ({med['poisoned'] / med['control']:.2f}x the control)"],
        ["... beside another key's batch of the poisoned line alone",
         f"{med['only']:.2f} ({med['only'] / med['alone']:.2f}x alone)"],
        ["each turn, alone / control / poisoned / poisoned line alone (s)",
         " ; ".join(" / ".join(f"{times[k][i]:.2f}" for k in times) for i in range(repeats))],
        ["poisoned batch", f"{batch['status']}, {batch['request_counts']}"],
        ["its error line", json.loads(errors[0])["error"]],
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = base_parser("bench.hardening", __doc__.splitlines()[0])
    p.add_argument("--part", choices=["hol", "download", "poison", "all"], default="all")
    args = p.parse_args(argv)
    n = 100 if args.quick else 400
    sections = []
    for part in ("hol", "download", "poison"):
        if args.part not in (part, "all"):
            continue
        if part == "hol":
            rows = hol(args.model_dir, n)
        elif part == "download":
            rows = download(args.model_dir, (20 if args.quick else 100) * 1_000_000)
        else:
            rows = poison(args.model_dir, n, repeats=3 if args.quick else 5)
        table = "\n".join(f"| {a} | {b} |" for a, b in rows)
        section = f"### {part}\n\n| measure | value |\n|---|---|\n{table}\n"
        print(section, flush=True)
        sections.append(section)
    header = (
        f"# Hardening\n\n`{command_line('bench.hardening', argv)}`\n\n{machine_line(machine())}\n\n"
    )
    (out_dir(args) / f"hardening-{args.part}.md").write_text(header + "\n".join(sections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
