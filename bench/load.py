"""The service under load against a naive server and two serving frameworks, in one run: real test
emails replayed by 1, 8, 32 and 128 concurrent clients; each server's docs/s, latency and CPU time
per document (its whole process tree, from /proc); the offline engine's schedules as the ceiling;
and interactive latency while a batch job runs.

The service (defaults: batching chosen by measurement) and the naive server run side by side and
take turns level by level, `--repeats` times (every other turn in reverse order), and each
figure is the median of the turns: on a shared host the machine's speed drifts by more than the
differences being measured. The targets table gives each bound's ratio turn by turn as well. At one
client they take turns more finely, every `--block` emails within a turn, so that a drift within
the turn cannot move one client's p50 of one server against the other's. The peers
(LitServe, Ray Serve) run after, once per level, from their own environment (`bench.peers`).

Every request is `POST /v1/classify {"input": <email>, "long_document": "truncate"}`, so every
server runs exactly the windows the offline engine does (the first n_max tokens).

    python -m bench.load [--quick] [--model-dir DIR] [--precision int8] [--peers LitServe ...]
"""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.common import (
    add_service_flag,
    base_parser,
    check_target,
    command_line,
    machine,
    markdown_table,
    out_dir,
    pyplot,
    read_config,
    versions,
    write_csv,
    write_fragment,
)
from bench.load_offline import (
    OfflineReference,
    OfflineResult,
    median_results,
    reference_emails,
)

TRUNCATE = {"long_document": "truncate"}
SERVICE, FORCED_ON, NAIVE = "service (defaults)", "service, --batching on", "naive server"
OURS = (SERVICE, FORCED_ON)
MIN_BLOCKS = 8  # fewer blocks than this give no bootstrap interval worth printing
# CPU ms per document of the service's threads, by role (its threads carry kernel names)
ROLES = {
    "linmod-engine": "engine_cpu_ms",
    "linmod-tokenize": "tokenize_cpu_ms",
    "loop": "loop_cpu_ms",
}
THREAD_CPU = [*ROLES.values(), "other_cpu_ms"]
STATS = ["windows_per_run", "engine_run_ms", "queue_wait_ms", *THREAD_CPU]
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
    "cpu_ms_per_doc",
    "outside_engine_ms",
    *STATS,
    "client_cpu_s",
    "turns",
]


def measured(
    server: loadgen.ServerProcess, texts: list[str], clients: int, metrics: bool
) -> tuple[loadgen.LevelResult, dict[str, float], float]:
    """One level: the clients' view, the service's own (its /metrics) and the server's CPU s."""
    url = server.url
    before = loadgen.counters(url) if metrics else {}
    threads0 = server.thread_cpu_s() if metrics else {}
    cpu0 = server.cpu_s()
    result = asyncio.run(loadgen.run_level(url, texts, clients, extra=TRUNCATE))
    cpu = server.cpu_s() - cpu0
    stats = loadgen.server_stats(before, loadgen.counters(url)) if metrics else {}
    if metrics:
        stats |= thread_cpu_ms(threads0, server.thread_cpu_s(), result.ok)
    return result, stats, cpu


def thread_cpu_ms(before: dict[str, float], after: dict[str, float], docs: int) -> dict[str, float]:
    """CPU ms per document of each role's threads between two readings (`THREAD_CPU`): the
    engine threads, the tokenizer threads, the event loop (the main thread) and the rest."""
    out = dict.fromkeys(THREAD_CPU, 0.0)
    for role, seconds in after.items():
        out[ROLES.get(role, "other_cpu_ms")] += seconds - before.get(role, 0.0)
    return {k: 1000 * v / docs if docs else float("nan") for k, v in out.items()}


def level_row(
    name: str,
    turns: list[tuple[loadgen.LevelResult, dict[str, float], float]],
    engine_cpu_ms: float,
) -> list[Any]:
    """The median over turns of each figure; CPU outside the engine against the offline engine's
    CPU per document."""

    def med(values: list[float]) -> float:
        values = [v for v in values if v == v]  # drop NaN
        return statistics.median(values) if values else float("nan")

    results = [r for r, _, _ in turns]
    cpu_ms = med([1000 * cpu / r.ok if r.ok else float("nan") for r, _, cpu in turns])
    return [
        name,
        results[0].clients,
        med([r.throughput for r in results]),
        med([r.ms(50) for r in results]),
        med([r.ms(95) for r in results]),
        med([r.ms(99) for r in results]),
        sum(r.ok for r in results),
        sum(r.errors for r in results),
        sum(r.throttled for r in results),
        cpu_ms,
        cpu_ms - engine_cpu_ms,
        *(med([s.get(k, float("nan")) for _, s, _ in turns]) for k in STATS),
        med([r.client_cpu_s for r in results]),
        len(turns),
    ]


def say(row: list[Any]) -> None:
    print(
        f"{row[0]:>26} {row[1]:>4} clients {row[2]:7.1f} docs/s  p50 {row[3]:7.1f}  "
        f"p99 {row[5]:7.0f} ms  cpu/doc {row[9]:5.1f} ms  errors {row[7]}  429s {row[8]}",
        flush=True,
    )


def turn_order(names: list[str], turn: int) -> list[str]:
    """The servers' order in a turn (or a block): every other one reversed, so that a steady
    drift of the machine's speed, or whatever favours a place in the order, falls on all alike."""
    return names if turn % 2 == 0 else names[::-1]


def one_client_turn(
    servers: dict[str, loadgen.ServerProcess], texts: list[str], block: int, turn: int
) -> dict[str, tuple[loadgen.LevelResult, dict[str, float], float]]:
    """One client, every server sent every text once, the servers taking turns every `block`
    texts (each block's order reversed from the last): a drift of the machine's speed within
    the turn falls on every server alike, where whole-level turns let it move one client's p50
    by several per cent. One merged result per server."""
    before = {name: loadgen.counters(s.url) for name, s in servers.items() if name in OURS}
    threads0 = {name: s.thread_cpu_s() for name, s in servers.items() if name in OURS}
    merged = {name: (loadgen.LevelResult(1), 0.0) for name in servers}
    for b, start in enumerate(range(0, len(texts), block)):
        for name in turn_order(list(servers), b + turn):
            server = servers[name]
            time.sleep(0.2)  # the previous server's threads settle
            cpu0 = server.cpu_s()
            got = asyncio.run(
                loadgen.run_level(server.url, texts[start : start + block], 1, extra=TRUNCATE)
            )
            total, cpu = merged[name]
            total.seconds += got.seconds
            total.latencies += got.latencies
            total.client_cpu_s += got.client_cpu_s
            for status, n in got.statuses.items():
                total.statuses[status] = total.statuses.get(status, 0) + n
            merged[name] = (total, cpu + server.cpu_s() - cpu0)
    return {
        name: (
            total,
            loadgen.server_stats(before[name], loadgen.counters(servers[name].url))
            | thread_cpu_ms(threads0[name], servers[name].thread_cpu_s(), total.ok)
            if name in OURS
            else {},
            cpu,
        )
        for name, (total, cpu) in merged.items()
    }


def side_by_side(
    servers: dict[str, loadgen.ServerProcess],
    texts: list[str],
    clients: list[int],
    repeats: int,
    engine_cpu_ms: float,
    block: int = 0,
    paired: dict[str, list[loadgen.LevelResult]] | None = None,
    offline: Callable[[], list[OfflineResult]] | None = None,
    offline_turns: dict[int, list[list[OfflineResult]]] | None = None,
    level_turns: dict[int, dict[str, list[loadgen.LevelResult]]] | None = None,
) -> list[list[Any]]:
    """Every server at every level, taking turns, `repeats` times (every other turn in reverse
    order); one row per server and level. With `block`, one client's level alternates the
    servers every `block` texts instead, and `paired` gets each server's turns there (latencies
    in text order). With `offline`, it is measured after every turn, into `offline_turns` by
    level: the ceiling of the same minutes.
    `level_turns` gets every turn's result, by level and server, in turn order."""
    for server in servers.values():  # warm connections and shapes
        asyncio.run(loadgen.run_level(server.url, texts[:32], 8, extra=TRUNCATE))
    rows = []
    for c in clients:
        turns: dict[str, list[Any]] = {name: [] for name in servers}
        for turn in range(repeats):
            if c == 1 and block and len(servers) > 1:
                for name, got in one_client_turn(servers, texts, block, turn).items():
                    turns[name].append(got)
                    if paired is not None:
                        paired.setdefault(name, []).append(got[0])
            else:
                for name in turn_order(list(servers), turn):
                    turns[name].append(measured(servers[name], texts, c, metrics=name in OURS))
            if level_turns is not None:
                for name in servers:
                    level_turns.setdefault(c, {}).setdefault(name, []).append(turns[name][-1][0])
            if offline is not None and offline_turns is not None:
                offline_turns.setdefault(c, []).append(offline())
        for name in servers:
            rows.append(level_row(name, turns[name], engine_cpu_ms))
            say(rows[-1])
    return rows


def one_client_interval(
    ours: list[loadgen.LevelResult], naive: list[loadgen.LevelResult], block: int
) -> tuple[float, float, float] | None:
    """From the interleaved one-client turns, where every text went to both servers: the 95%
    bootstrap interval of the ratio of p50s (whole blocks resampled, as `bench.paired` does)
    and the median per-text difference in ms; None where a turn lost an answer. Under
    MIN_BLOCKS blocks there are too few to resample: the interval is NaN."""
    from bench.paired import bootstrap_ratio

    rows: list[tuple[int, int, float, float]] = []
    for turn, (a, b) in enumerate(zip(ours, naive, strict=True)):
        if len(a.latencies) != len(b.latencies) or not a.latencies:
            return None
        blocks = -(-len(a.latencies) // block)
        for i, (s, n) in enumerate(zip(a.latencies, b.latencies, strict=True)):
            rows.append((turn * blocks + i // block, 0, s, n))
    diff = 1000 * statistics.median(s - n for _, _, s, n in rows)
    if len({index for index, _, _, _ in rows}) < MIN_BLOCKS:
        return float("nan"), float("nan"), diff
    low, high = bootstrap_ratio(rows)
    return low, high, diff


def batch_job_part(
    server: loadgen.ServerProcess, texts: list[str], args: Any, engine_cpu_ms: float
) -> tuple[list[list[Any]], str]:
    """Interactive latency idle and while a batch job runs; rows and a sentence on the job."""
    url = server.url
    if not loadgen.has_batches(url):
        return [], "skipped: the service serves no /v1/files and /v1/batches"
    interactive = texts[: args.interactive_requests]
    idle = measured(server, interactive, args.interactive_clients, True)
    content = loadgen.batch_file(texts, args.job_lines, TRUNCATE)
    t0 = time.monotonic()
    batch_id = loadgen.start_batch(url, content)
    running = ("in_progress", "finalizing", "completed", "failed", "cancelled", "expired")
    start = loadgen.wait_batch(url, batch_id, running, timeout=300)
    busy = measured(server, interactive, args.interactive_clients, True)
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
        level_row("interactive, idle", [idle], engine_cpu_ms),
        level_row("interactive, during job", [busy], engine_cpu_ms),
    ]
    return rows, note


def peer_rows(
    args: Any, texts: list[str], tmp: Path, engine_cpu_ms: float
) -> tuple[list[list[Any]], list[str]]:
    """LitServe and Ray Serve, each alone, once per level; notes on any that could not run."""
    from bench.peers import PEERS, command, ensure_venv

    if not args.peers:
        return [], []
    python, why = ensure_venv()
    if python is None:
        return [], [f"peers skipped: {why}"]
    rows, notes = [], []
    for name in args.peers:
        port = loadgen.free_port()
        cmd = command(python, PEERS[name], args.model_dir.resolve(), port, args.precision)
        url = f"http://127.0.0.1:{port}"
        ready = "/health" if PEERS[name] == "litserve" else "/ready"
        try:
            with loadgen.ServerProcess(cmd, url, tmp / f"{name}.log", ready_path=ready) as server:
                rows += side_by_side({name: server}, texts, args.clients, 1, engine_cpu_ms)
        except RuntimeError as exc:
            notes.append(f"{name} skipped: {str(exc)[-400:]}")
    return rows, notes


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = base_parser("python -m bench.load", __doc__ or "")
    p.add_argument("--precision", choices=["fp32", "int8", "fp16"], default="int8")
    p.add_argument("--clients", type=int, nargs="+", help="levels (default 1 32 quick, 1 8 32 128)")
    p.add_argument("--docs", type=int, help="test emails per level (default 150 quick, 400)")
    p.add_argument("--repeats", type=int, help="turns per level of service and naive (1 quick, 3)")
    p.add_argument(
        "--peers", nargs="*", choices=["LitServe", "Ray Serve"], default=["LitServe", "Ray Serve"]
    )
    p.add_argument(
        "--block",
        type=int,
        default=50,
        help="at one client, the servers take turns every BLOCK texts (0: a whole level each)",
    )
    p.add_argument("--interactive-clients", type=int, default=4)
    p.add_argument("--interactive-requests", type=int, help="default 60 quick, 400")
    p.add_argument("--job-lines", type=int, help="batch-job lines (default 1,000 quick, 10,000)")
    p.add_argument(
        "--job-wait", type=float, help="seconds to wait for the job (default: cancel quick, 3600)"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="offline engine")
    p.add_argument(
        "--settle",
        type=float,
        default=5.0,
        help="seconds of rest after each offline measurement, before the next server's turn "
        "(after half a second, the server that went next measured slower: bench/ANALYSIS.md)",
    )
    add_service_flag(p)
    args = p.parse_args(argv)
    if args.block < 0:
        p.error("--block must be 0 or more")
    q = args.quick
    args.clients = args.clients or ([1, 32] if q else [1, 8, 32, 128])
    docs = args.docs if args.docs is not None else (150 if q else 400)
    args.repeats = args.repeats or (1 if q else 3)
    args.interactive_requests = args.interactive_requests or (60 if q else 400)
    args.job_lines = args.job_lines or (1000 if q else 10000)
    args.job_wait = args.job_wait if args.job_wait is not None else (0 if q else 3600)
    started, out = machine(), out_dir(args)
    cfg = read_config(args.model_dir)

    texts, seqs = reference_emails(args.model_dir, args.data, docs, cfg["n_max"])

    print(f"offline engine ({args.precision}) over {len(seqs)} emails ...", flush=True)
    reference = OfflineReference(args.model_dir, args.precision, args.threads, seqs)
    offline = reference.measure(1 if q else 3)
    for o in offline:
        print(f"  {o.name}: {o.docs_per_s:.1f} docs/s, {o.cpu_ms_per_doc:.1f} ms CPU/doc")

    def offline_again() -> list[OfflineResult]:
        again = reference.measure()
        time.sleep(args.settle)  # the machine settles before the next server's turn
        return again

    # CPU per document of the engine alone: what one run per document costs offline, the
    # reference the naive server and the table subtract as well.
    engine_cpu_ms = next(o for o in offline if o.name.startswith("one per run")).cpu_ms_per_doc

    rows: list[list[Any]] = []
    job_rows: list[list[Any]] = []
    job_note, notes = "not run", []
    paired: dict[str, list[loadgen.LevelResult]] = {}
    offline_turns: dict[int, list[list[OfflineResult]]] = {}
    level_turns: dict[int, dict[str, list[loadgen.LevelResult]]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        servers: dict[str, loadgen.ServerProcess] = {}
        try:
            for name, flags in (
                (SERVICE, args.service_flag),
                (FORCED_ON, ["--batching", "on", *args.service_flag]),
            ):
                port = loadgen.free_port()
                cmd = loadgen.service_command(
                    args.model_dir, port, args.precision, tmp / f"jobs-{port}.db", *flags
                )
                servers[name] = loadgen.ServerProcess(
                    cmd, f"http://127.0.0.1:{port}", tmp / f"{port}.log"
                )
            port = loadgen.free_port()
            servers[NAIVE] = loadgen.ServerProcess(
                loadgen.naive_command(args.model_dir, port, args.precision),
                f"http://127.0.0.1:{port}",
                tmp / "naive.log",
            )
            rows += side_by_side(
                servers, texts, args.clients, args.repeats, engine_cpu_ms, args.block, paired,
                offline_again, offline_turns, level_turns,
            )  # fmt: skip
            policy = loadgen.batching_policy(servers[SERVICE].url)
            job_rows, job_note = batch_job_part(servers[SERVICE], texts, args, engine_cpu_ms)
            print(job_note, flush=True)
        finally:
            reference.close()
            for server in servers.values():
                server.stop()
        more, notes = peer_rows(args, texts, tmp, engine_cpu_ms)
        rows += more

    interval = None
    if SERVICE in paired and NAIVE in paired:
        interval = one_client_interval(paired[SERVICE], paired[NAIVE], args.block)
    by_level = {c: median_results(measures) for c, measures in offline_turns.items()}
    report(
        args, argv, out, started, rows, job_rows, job_note, notes, offline, policy, len(texts),
        interval, by_level, each_turn(level_turns, offline_turns),
    )  # fmt: skip
    return 0


def best_offline(results: list[OfflineResult]) -> OfflineResult:
    """The issue's ceiling: the better of sorted batches and one per run (not one per core)."""
    return max(
        (o for o in results if not o.name.startswith("one per core")), key=lambda o: o.docs_per_s
    )


def each_turn(
    level_turns: dict[int, dict[str, list[loadgen.LevelResult]]],
    offline_turns: dict[int, list[list[OfflineResult]]],
) -> dict[str, list[float]]:
    """The bounds' ratios turn by turn, each turn's service against the naive server's run
    just before or after it (and the offline engine measured right after it): how far the
    machine's drift moves a ratio between turns, beside the medians the targets use."""
    ours, naive = level_turns.get(32, {}).get(SERVICE, []), level_turns.get(32, {}).get(NAIVE, [])
    one, one_naive = level_turns.get(1, {}).get(SERVICE, []), level_turns.get(1, {}).get(NAIVE, [])
    ceilings = [best_offline(turn).docs_per_s for turn in offline_turns.get(32, [])]
    return {
        "throughput": turn_ratios(ours, naive, docs_per_s),
        "p99": turn_ratios(ours, naive, p99_ms),
        # no ceiling where the offline engine was not measured between turns
        "ceiling": [
            a.throughput / c if c else math.nan for a, c in zip(ours, ceilings, strict=False)
        ],
        "one client": turn_ratios(one, one_naive, p50_ms),
    }


def docs_per_s(result: loadgen.LevelResult) -> float:
    return result.throughput


def p50_ms(result: loadgen.LevelResult) -> float:
    return result.ms(50) if result.latencies else math.nan


def p99_ms(result: loadgen.LevelResult) -> float:
    return result.ms(99) if result.latencies else math.nan


def turn_ratios(
    ours: Sequence[loadgen.LevelResult],
    theirs: Sequence[loadgen.LevelResult],
    figure: Callable[[loadgen.LevelResult], float],
) -> list[float]:
    """`figure` of each of our turns over theirs in the same turn (NaN where theirs is 0 or
    missing): the two runs of a turn are seconds apart, so the drift between turns cancels."""
    return [
        figure(a) / b if (b := figure(t)) and not math.isnan(b) else math.nan
        for a, t in zip(ours, theirs, strict=True)
    ]


def turns_cell(ratios: list[float], bound: float, at_least: bool) -> str:
    """'1.12 1.04 1.15 (2 of 3 met)', or a dash without turns."""
    if not ratios:
        return "–"
    met = sum(1 for r in ratios if (r >= bound if at_least else r <= bound))
    return f"{' '.join(f'{r:.2f}' for r in ratios)} ({met} of {len(ratios)} met)"


def report(
    args: Any,
    argv: list[str],
    out: Path,
    started: dict[str, Any],
    rows: list[list[Any]],
    job_rows: list[list[Any]],
    job_note: str,
    notes: list[str],
    offline: list[OfflineResult],
    policy: dict[str, Any],
    n_docs: int,
    interval: tuple[float, float, float] | None = None,
    by_level: dict[int, list[OfflineResult]] | None = None,
    turns: dict[str, list[float]] | None = None,
) -> None:
    """`offline`: the schedules measured before the servers; `by_level`: measured again after
    each turn of each level, medians by level. A level is held to its own turns' ceiling.
    `turns`: the ratios turn by turn (`each_turn`), shown beside the medians' ratios."""
    by_level, turns = by_level or {}, turns or {}

    write_csv(out / "load.csv", HEADERS, rows + job_rows)
    plot(rows, offline, out / "load.png")
    get = {(r[0], r[1]): r for r in rows}
    nan_row = [float("nan")] * len(HEADERS)
    ours = [r for r in rows if r[0] == SERVICE]
    best = max(ours, key=lambda r: r[2], default=nan_row)
    best_ceiling = best_offline(by_level.get(32, offline))
    best_at_best = best_offline(
        by_level.get(int(best[1]), offline) if best is not nan_row else offline
    )
    ceiling_when = " in the same turns" if 32 in by_level else ""
    at32, naive32 = get.get((SERVICE, 32), nan_row), get.get((NAIVE, 32), nan_row)
    at1, naive1 = get.get((SERVICE, 1), nan_row), get.get((NAIVE, 1), nan_row)
    idle = next((r for r in job_rows if r[0] == "interactive, idle"), nan_row)
    busy = next((r for r in job_rows if r[0] == "interactive, during job"), nan_row)
    checks = [
        (
            "docs/s >= 1.10x the naive server's at 32 clients",
            at32[2] / naive32[2],
            1.10,
            True,
            "throughput",
        ),
        ("p99 <= 0.5x the naive server's at 32 clients", at32[5] / naive32[5], 0.5, False, "p99"),
        (
            f"docs/s at 32 clients >= 0.90x the best offline schedule{ceiling_when} "
            f"({best_ceiling.name}, {best_ceiling.docs_per_s:.1f} docs/s)",
            at32[2] / best_ceiling.docs_per_s,
            0.9,
            True,
            "ceiling",
        ),
        (
            "CPU ms per document outside the engine <= the naive server's, at 32 clients "
            f"(ours {at32[10]:.1f}, the naive server's {naive32[10]:.1f}; their difference)",
            at32[10] - naive32[10],
            0.0,
            False,
            "",
        ),
        (
            "p50 at 1 client <= the naive server's"
            + (
                f" (the turns pooled: 95% interval over blocks {interval[0]:.2f} to "
                f"{interval[1]:.2f}, median per-email difference {interval[2]:+.2f} ms)"
                if interval and interval[0] == interval[0]
                else f" (the turns pooled: median per-email difference {interval[2]:+.2f} ms; "
                f"too few blocks for an interval)"
                if interval
                else ""
            ),
            at1[3] / naive1[3],
            1.0,
            False,
            "one client",
        ),
        ("p99 <= 3x p50 at 32 clients", at32[5] / at32[3], 3.0, False, ""),
        ("interactive p99 during a batch job <= 2x idle", busy[5] / idle[5], 2.0, False, ""),
    ]
    targets = [
        [
            name,
            f"{v:.2f}",
            ("met" if v <= b else "missed") if b == 0.0 else check_target(v, b, at_least),
            turns_cell(turns.get(key, []), b, at_least),
        ]
        for name, v, b, at_least, key in checks
    ]
    levels = sorted(by_level)
    offline_table = markdown_table(
        ["offline schedule", "docs_per_s", "cpu_ms_per_doc"]
        + [f"docs_per_s, turns of {c} clients" for c in levels],
        [
            [o.name, o.docs_per_s, o.cpu_ms_per_doc] + [by_level[c][i].docs_per_s for c in levels]
            for i, o in enumerate(offline)
        ],
    )
    body = "\n\n".join(
        [
            markdown_table(HEADERS, rows + job_rows),
            f"Offline engine on the same {n_docs} emails and precision ({args.precision}, head "
            f"windows, tokenized beforehand, {args.threads} cores), before the servers and again "
            "after each turn of each level (the median of those turns):",
            offline_table,
            f"The service's best level reached {best[2]:.1f} docs/s at {best[1]} clients "
            f"({100 * best[2] / best_at_best.docs_per_s:.0f}% of the best offline schedule"
            f"{' in its turns' if best[1] in by_level else ''}).",
            f"The service's batching policy, chosen at warm-up (`/info`): "
            f"{'batching' if policy.get('batching') else 'one window per run'}: "
            f"{policy.get('reason', 'unknown')}.",
            f"Batch job: {job_note}.",
            *notes,
            "`cpu_ms_per_doc` is the server's whole process tree (from /proc) over the documents "
            "answered; `outside_engine_ms` subtracts the offline engine's CPU per document run one "
            f"per run ({offline[1].cpu_ms_per_doc:.1f} ms), the same for every server. "
            "The service's CPU per document by thread, from /proc (its threads carry kernel "
            "names): `engine_cpu_ms` its engine threads (ONNX Runtime's runs, padding), "
            "`tokenize_cpu_ms` its tokenizer threads, `loop_cpu_ms` the event loop's thread "
            "(HTTP, JSON, the request path; at one client also the short runs made there), "
            "`other_cpu_ms` the rest (ONNX Runtime's helper threads for a run alone, the "
            "database thread). "
            "`client_cpu_s` is the load generator's own CPU time per level: on a small machine it "
            "competes with the server for the same cores. Service and naive rows are medians of "
            "`turns` alternating runs"
            + (
                f"; at one client each turn sends every email to every server, the servers "
                f"taking turns every {args.block} emails."
                if args.block
                else "."
            ),
            "Targets (`measured`: the ratio of the rows above, medians of the turns; `each turn`: "
            "the same ratio turn by turn, each turn's service run against the naive server's "
            "run beside it and the offline engine measured right after it):",
            markdown_table(["target", "measured", "status", "each turn"], targets),
            "![load](load.png)",
        ]
    )
    facts = {
        "Model": f"{args.model_dir.name}, precision {args.precision}",
        "Workload": f"{n_docs} test emails per level (shuffled once, seed 0), each sent once; "
        f"interactive: {args.interactive_clients} clients x {args.interactive_requests} requests",
        "Service flags": " ".join(args.service_flag) or "defaults",
        "Software": versions("onnxruntime", "fastapi", "uvicorn", "httptools"),
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
    print("\n" + markdown_table(["target", "measured", "status", "each turn"], targets))
    print(f"\nwrote {path}, load.csv and load.png in {out}")


def plot(rows: list[list[Any]], offline: list[OfflineResult], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    names = list(dict.fromkeys(r[0] for r in rows))
    for name in names:
        pts = sorted((r for r in rows if r[0] == name), key=lambda r: r[1])
        xs = [r[1] for r in pts]
        axes[0].plot(xs, [r[2] for r in pts], marker="o", label=name)
        axes[1].plot(xs, [r[5] for r in pts], marker="o", label=name)
        axes[2].plot(xs, [r[9] for r in pts], marker="o", label=name)
    for style, o in zip(("--", ":", "-."), offline, strict=False):
        axes[0].axhline(o.docs_per_s, linestyle=style, color="gray", label=f"offline, {o.name}")
    axes[0].set(
        xscale="log", xlabel="concurrent clients", ylabel="documents / s", title="throughput"
    )
    axes[1].set(
        xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms", title="p99 latency"
    )
    axes[2].set(
        xscale="log", xlabel="concurrent clients", ylabel="ms", title="server CPU per document"
    )
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
