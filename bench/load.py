"""The service under load: real test emails replayed by 1, 8, 32 and 128 concurrent clients against
`linmod-serve` started as a subprocess, with dynamic batching and with batching off (max batch size
1); a naive server at 32 clients; interactive latency while a batch job runs; and the service's
throughput against the offline engine's on the same documents and precision.

Every request is `POST /v1/classify {"input": <email>, "long_document": "truncate"}`, so the
service runs exactly the windows the offline engine does (the first n_max tokens).

    python -m bench.load [--quick] [--model-dir DIR] [--precision int8]
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.common import (
    base_parser,
    check_target,
    command_line,
    encode,
    load_test_split,
    machine,
    markdown_table,
    out_dir,
    pyplot,
    read_config,
    versions,
    write_csv,
    write_fragment,
)

TRUNCATE = {"long_document": "truncate"}
STATS = ["real_over_padded", "windows_per_run", "engine_run_ms", "queue_wait_ms"]
HEADERS = [
    "server",
    "clients",
    "docs_per_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "ok",
    "errors",
    "http_429",
    *STATS,
    "client_cpu_s",
    "seconds",
]


def measured(
    url: str, texts: list[str], clients: int, metrics: bool
) -> tuple[Any, dict[str, float]]:
    """One level, with the service's own view of it from /metrics when it has one."""
    before = loadgen.counters(url) if metrics else {}
    result = asyncio.run(loadgen.run_level(url, texts, clients, extra=TRUNCATE))
    stats = loadgen.server_stats(before, loadgen.counters(url)) if metrics else {}
    return result, stats


def row(server: str, r: loadgen.LevelResult, stats: dict[str, float]) -> list[Any]:
    return [
        server,
        r.clients,
        r.throughput,
        r.ms(50),
        r.ms(95),
        r.ms(99),
        r.ok,
        r.errors,
        r.throttled,
        *(stats.get(k, float("nan")) for k in STATS),
        r.client_cpu_s,
        r.seconds,
    ]


def levels(
    url: str, name: str, texts: list[str], clients: list[int], metrics: bool
) -> list[list[Any]]:
    rows = []
    asyncio.run(loadgen.run_level(url, texts[:32], 8, extra=TRUNCATE))  # warm connections, shapes
    for c in clients:
        result, stats = measured(url, texts, c, metrics)
        rows.append(row(name, result, stats))
        print(
            f"{name:>24} {c:>4} clients  {result.throughput:7.1f} docs/s  "
            f"p50 {result.ms(50):7.0f}  p99 {result.ms(99):7.0f} ms  "
            f"errors {result.errors}  429s {result.throttled}",
            flush=True,
        )
    return rows


def batch_job_part(url: str, texts: list[str], args: Any) -> tuple[list[list[Any]], str]:
    """Interactive latency idle and while a batch job runs; rows and a sentence on the job."""
    if not loadgen.has_batches(url):
        return [], "skipped: the service serves no /v1/files and /v1/batches"
    interactive = texts[: args.interactive_requests]
    idle, idle_stats = measured(url, interactive, args.interactive_clients, True)
    content = loadgen.batch_file(texts, args.job_lines, TRUNCATE)
    t0 = time.monotonic()
    batch_id = loadgen.start_batch(url, content)
    running = ("in_progress", "finalizing", "completed", "failed", "cancelled", "expired")
    start = loadgen.wait_batch(url, batch_id, running, timeout=300)
    busy, busy_stats = measured(url, interactive, args.interactive_clients, True)
    after = loadgen.batch_status(url, batch_id)
    during = after["status"] == "in_progress"
    counts = after["request_counts"]
    note = (
        f"{args.job_lines:,}-line batch job: {start['status']} when the interactive run began, "
        f"{after['status']} when it ended ({counts['completed']:,} lines done, "
        f"{counts['failed']:,} failed, {time.monotonic() - t0:.0f} s after upload)"
    )
    if not during:
        note += "; the job was not running throughout, so this is not a measurement under a job"
    if args.job_wait:
        end = loadgen.wait_batch(
            url, batch_id, ("completed", "failed", "expired", "cancelled"), timeout=args.job_wait
        )
        seconds = time.monotonic() - t0
        c = end["request_counts"]
        note += (
            f"; it ended {end['status']} after {seconds:.0f} s: {c['completed']:,} lines "
            f"completed, {c['failed']:,} failed ({c['completed'] / seconds:.1f} lines/s)"
        )
    elif during:
        loadgen.cancel_batch(url, batch_id)
        note += "; then cancelled"
    rows = [
        row("interactive, idle", idle, idle_stats),
        row("interactive, during job", busy, busy_stats),
    ]
    return rows, note


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = base_parser("python -m bench.load", __doc__ or "")
    p.add_argument("--precision", choices=["fp32", "int8", "fp16"], default="int8")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--docs", type=int, help="test emails per level (default 150 quick, all)")
    p.add_argument("--naive-clients", type=int, nargs="*", default=[32])
    p.add_argument("--interactive-clients", type=int, default=4)
    p.add_argument("--interactive-requests", type=int, help="default 60 quick, 400")
    p.add_argument("--job-lines", type=int, help="batch-job lines (default 1,000 quick, 10,000)")
    p.add_argument(
        "--job-wait", type=float, help="seconds to wait for the job (default: cancel quick, 3600)"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="offline engine")
    p.add_argument(
        "--service-flag",
        action="append",
        default=[],
        help="an extra linmod-serve flag, written with '=': --service-flag=--max-wait-ms=10",
    )
    args = p.parse_args(argv)
    q = args.quick
    docs = args.docs if args.docs is not None else (150 if q else 0)
    args.interactive_requests = args.interactive_requests or (60 if q else 400)
    args.job_lines = args.job_lines or (1000 if q else 10000)
    args.job_wait = args.job_wait if args.job_wait is not None else (0 if q else 3600)
    started, out = machine(), out_dir(args)
    cfg = read_config(args.model_dir)

    examples = load_test_split(args.data, docs)
    full = encode(args.model_dir, [e.text for e in examples])
    pairs = [(e.text, ids[: cfg["n_max"]]) for e, ids in zip(examples, full, strict=True) if ids]
    random.Random(0).shuffle(pairs)  # long and short emails mixed, the same order every run
    texts, seqs = [t for t, _ in pairs], [s for _, s in pairs]

    from bench.runners import offline_docs_per_s, ort_runner

    print(f"offline engine ({args.precision}) over {len(seqs)} emails ...", flush=True)
    engine = ort_runner(args.model_dir, args.precision, args.threads)
    assert engine is not None
    offline, *_ = offline_docs_per_s(engine, seqs, cfg.get("pad_id", 0), passes=1 if q else 3)
    offline_b1, *_ = offline_docs_per_s(engine, seqs, cfg.get("pad_id", 0), 1, batched=False)
    del engine
    print(f"offline: {offline:.1f} docs/s batched, {offline_b1:.1f} one per run", flush=True)

    rows: list[list[Any]] = []
    job_rows: list[list[Any]] = []
    job_note = "not run"
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags, with_jobs in (
            ("service, batching", args.service_flag, True),
            ("service, max batch 1", ["--max-batch-size", "1", *args.service_flag], False),
        ):
            port = loadgen.free_port()
            cmd = loadgen.service_command(
                args.model_dir, port, args.precision, Path(tmp) / f"jobs-{port}.db", *flags
            )
            url = f"http://127.0.0.1:{port}"
            with loadgen.ServerProcess(cmd, url, Path(tmp) / f"{port}.log") as server:
                rows += levels(url, name, texts, args.clients, metrics=True)
                if with_jobs:
                    job_rows, job_note = batch_job_part(url, texts, args)
                    print(job_note, flush=True)
            if server.proc.returncode not in (0, -15):
                print(f"{name}: server exited with {server.proc.returncode}:\n{server.tail()}")
        if args.naive_clients:
            port = loadgen.free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = loadgen.naive_command(args.model_dir, port, args.precision)
            with loadgen.ServerProcess(cmd, url, Path(tmp) / "naive.log"):
                rows += levels(url, "naive server", texts, args.naive_clients, metrics=False)

    report(args, argv, out, started, rows + job_rows, job_note, offline, offline_b1, len(texts))
    return 0


def report(
    args: Any,
    argv: list[str],
    out: Path,
    started: dict[str, Any],
    rows: list[list[Any]],
    job_note: str,
    offline: float,
    offline_b1: float,
    n_docs: int,
) -> None:
    write_csv(out / "load.csv", HEADERS, rows)
    plot(rows, offline, out / "load.png")
    get = {(r[0], r[1]): r for r in rows}
    nan_row = [float("nan")] * len(HEADERS)
    batching = [r for r in rows if r[0] == "service, batching"]
    best = max(batching, key=lambda r: r[2], default=nan_row)
    at32, off32 = (
        get.get(("service, batching", 32), nan_row),
        get.get(("service, max batch 1", 32), nan_row),
    )
    naive = get.get(("naive server", 32), nan_row)
    idle = get.get(("interactive, idle", args.interactive_clients), nan_row)
    busy = get.get(("interactive, during job", args.interactive_clients), nan_row)
    ratio_tokens = min((r[9] for r in batching), default=float("nan"))
    checks = [
        ("service at saturation >= 90% of offline engine docs/s", best[2] / offline, 0.9, True),
        ("throughput >= naive server's at 32 clients", at32[2] / naive[2], 1.0, True),
        ("p99 <= half the naive server's at 32 clients", at32[5] / naive[5], 0.5, False),
        ("batching >= 1.25x max batch 1 at 32 clients", at32[2] / off32[2], 1.25, True),
        ("p99 <= 3x p50 at 32 clients", at32[5] / at32[3], 3.0, False),
        ("real / padded tokens >= 0.85 (lowest level)", ratio_tokens, 0.85, True),
        ("interactive p99 during a batch job <= 2x idle", busy[5] / idle[5], 2.0, False),
    ]
    targets = [[name, f"{v:.2f}", check_target(v, b, at_least)] for name, v, b, at_least in checks]
    body = "\n\n".join(
        [
            markdown_table(HEADERS, rows),
            f"Offline engine on the same {n_docs} emails and precision ({args.precision}, "
            f"head windows, length-sorted batches of <= 32 documents and 16,384 padded tokens): "
            f"{offline:.1f} docs/s; one document per run {offline_b1:.1f} docs/s. The service's best "
            f"level reached {best[2]:.1f} docs/s ({100 * best[2] / offline:.0f}% of offline).",
            f"Batch job: {job_note}.",
            "`client_cpu_s` is the CPU time the load generator itself used during the level; on a "
            "small machine it competes with the server for the same cores.",
            "Targets:",
            markdown_table(["target", "measured", "status"], targets),
            "![load](load.png)",
        ]
    )
    facts = {
        "Model": f"{args.model_dir.name}, precision {args.precision}",
        "Workload": f"{n_docs} test emails per level (shuffled once, seed 0), each sent once; "
        f"interactive: {args.interactive_clients} clients x {args.interactive_requests} requests",
        "Service flags": " ".join(args.service_flag)
        or "defaults (max batch 32, 16,384 tokens, 5 ms max wait)",
        "Software": versions("onnxruntime", "fastapi", "uvicorn", "httpx"),
    }
    path = write_fragment(
        out,
        "load",
        "The service under load",
        command_line("bench.load", argv),
        facts,
        body,
        args.quick,
        started,
    )
    print("\n" + markdown_table(["target", "measured", "status"], targets))
    print(f"\nwrote {path}, load.csv and load.png in {out}")


def plot(rows: list[list[Any]], offline: float, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in ("service, batching", "service, max batch 1", "naive server"):
        pts = sorted((r for r in rows if r[0] == name), key=lambda r: r[1])
        if pts:
            axes[0].plot([r[1] for r in pts], [r[2] for r in pts], marker="o", label=name)
            axes[1].plot([r[1] for r in pts], [r[5] for r in pts], marker="o", label=name)
    axes[0].axhline(offline, linestyle="--", color="gray", label="offline engine")
    axes[0].set(
        xscale="log", xlabel="concurrent clients", ylabel="documents / s", title="throughput"
    )
    axes[1].set(
        xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms", title="p99 latency"
    )
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
