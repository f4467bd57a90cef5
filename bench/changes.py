"""Before and after: the service at several git revisions, side by side in one run, to record
what each change to the request path did. Each revision is checked out into a temporary work
tree and served from there with this environment's packages; the naive server runs beside them.
Revisions and the naive server take turns level by level, `--repeats` times (every other turn
in reverse order); figures are the medians of the turns, and above one client each revision's
docs/s and p99 are also given against the naive server's turn by turn. At one client they take
turns every `--block` emails within a turn, as `bench.load` does, and each revision's row gives
its median per-email difference from the naive server: one client's p50 moves by more between
turns than most changes to the request path.

    python -m bench.changes REV[=label] ... [--clients 1 32] [--docs 300] [--repeats 3]
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.common import (
    BENCH_DIR,
    base_parser,
    command_line,
    load_test_split,
    machine,
    markdown_table,
    out_dir,
    versions,
    write_csv,
    write_fragment,
)
from bench.load import docs_per_s, one_client_turn, p99_ms, turn_order, turn_ratios

TRUNCATE = {"long_document": "truncate"}
HEADERS = [
    "server", "clients", "docs_per_s", "p50_ms", "p99_ms", "cpu_ms_per_doc", "turns",
    "ms_per_email_vs_naive", "docs_per_s_vs_naive", "p99_vs_naive",
]  # fmt: skip


def checkout(rev: str, into: Path) -> Path:
    """A detached work tree of `rev` (the shipped model is taken from this checkout)."""
    repo = BENCH_DIR.parent
    subprocess.run(
        ["git", "-C", str(repo), "worktree", "add", "--detach", str(into), rev],
        check=True, capture_output=True,
    )  # fmt: skip
    return into


def serve(tree: Path, model_dir: Path, tmp: Path, name: str) -> loadgen.ServerProcess:
    port = loadgen.free_port()
    cmd = loadgen.service_command(model_dir, port, "int8", tmp / f"{name}.db")
    cmd[: cmd.index("--model-dir")] = [sys.executable, "-m", "service.cli"]
    return loadgen.ServerProcess(
        cmd,
        f"http://127.0.0.1:{port}",
        tmp / f"{name}.log",
        cwd=tree,
        extra_env={"PYTHONPATH": str(tree)},
    )


def per_email_difference(
    ours: list[tuple[loadgen.LevelResult, float]], naive: list[tuple[loadgen.LevelResult, float]]
) -> float | str:
    """Median over every email of every turn of (this server's latency - the naive server's),
    in ms: each email went to both in the same block, so the machine's drift cancels."""
    diffs = [
        1000 * (a - b)
        for (x, _), (y, _) in zip(ours, naive, strict=True)
        if len(x.latencies) == len(y.latencies)
        for a, b in zip(x.latencies, y.latencies, strict=True)
    ]
    return round(statistics.median(diffs), 3) if diffs else ""


def paired_ratio(
    ours: list[tuple[loadgen.LevelResult, float]],
    naive: list[tuple[loadgen.LevelResult, float]],
    figure: Callable[[loadgen.LevelResult], float] = docs_per_s,
) -> float | str:
    """Median over the turns of this server's `figure` (docs/s) over the naive server's in the
    same turn (`bench.load.turn_ratios`); turns where the naive server answered nothing are left
    out."""
    ratios = turn_ratios([r for r, _ in ours], [r for r, _ in naive], figure)
    kept = [r for r in ratios if not math.isnan(r)]
    return round(statistics.median(kept), 3) if kept else ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = base_parser("python -m bench.changes", __doc__ or "")
    p.add_argument("revisions", nargs="+", help="git revisions, each optionally =label")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 32])
    p.add_argument("--docs", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--block", type=int, default=50,
        help="at one client, the servers take turns every BLOCK emails within a turn (0: whole "
        "levels), and each row gives its median per-email difference from the naive server",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.block < 0:
        p.error("--block must be 0 or more")
    started, out = machine(), out_dir(args)
    examples = load_test_split(args.data, args.docs)
    texts = [e.text for e in examples]
    random.Random(0).shuffle(texts)
    model_dir = args.model_dir.resolve()
    rows: list[list[Any]] = []
    trees: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        servers: dict[str, loadgen.ServerProcess] = {}
        try:
            for spec in args.revisions:
                rev, _, label = spec.partition("=")
                tree = checkout(rev, tmp / f"tree-{len(trees)}")
                trees.append(tree)
                servers[label or rev] = serve(tree, model_dir, tmp, f"s{len(trees)}")
            port = loadgen.free_port()
            servers["naive server"] = loadgen.ServerProcess(
                loadgen.naive_command(model_dir, port, "int8"),
                f"http://127.0.0.1:{port}",
                tmp / "naive.log",
            )
            for server in servers.values():
                asyncio.run(loadgen.run_level(server.url, texts[:32], 8, extra=TRUNCATE))
            for c in args.clients:
                turns: dict[str, list[tuple[Any, float]]] = {n: [] for n in servers}
                for turn in range(args.repeats):
                    if c == 1 and args.block:
                        got_turn = one_client_turn(servers, texts, args.block, turn)
                        for name, (r, _, cpu) in got_turn.items():
                            turns[name].append((r, cpu))
                        continue
                    for name in turn_order(list(servers), turn):
                        server = servers[name]
                        cpu0 = server.cpu_s()
                        r = asyncio.run(loadgen.run_level(server.url, texts, c, extra=TRUNCATE))
                        turns[name].append((r, server.cpu_s() - cpu0))
                        print(
                            f"  {c} clients, turn {turn + 1}/{args.repeats}, {name}: "
                            f"{r.throughput:.1f} docs/s, p99 {r.ms(99):.0f} ms",
                            flush=True,
                        )
                for name, got in turns.items():
                    med = statistics.median
                    rows.append([
                        name, c, med(r.throughput for r, _ in got), med(r.ms(50) for r, _ in got),
                        med(r.ms(99) for r, _ in got),
                        med(1000 * cpu / r.ok for r, cpu in got if r.ok), len(got),
                        per_email_difference(got, turns["naive server"])
                        if c == 1 and args.block and name != "naive server"
                        else "",
                        paired_ratio(got, turns["naive server"])
                        if c > 1 and name != "naive server"
                        else "",
                        paired_ratio(got, turns["naive server"], p99_ms)
                        if c > 1 and name != "naive server"
                        else "",
                    ])  # fmt: skip
                    print(markdown_table(HEADERS, rows[-1:]).splitlines()[-1], flush=True)
        finally:
            for server in servers.values():
                server.stop()
            for tree in trees:
                subprocess.run(
                    ["git", "-C", str(BENCH_DIR.parent), "worktree", "remove", "--force", str(tree)],
                    capture_output=True,
                )  # fmt: skip
                shutil.rmtree(tree, ignore_errors=True)
    write_csv(out / "changes.csv", HEADERS, rows)
    facts = {
        "Model": f"{args.model_dir.name}, int8, CPU",
        "Workload": f"{len(texts)} test emails per level, `long_document: truncate`",
        "Software": versions("onnxruntime", "fastapi", "uvicorn", "httptools"),
    }
    body = markdown_table(HEADERS, rows) + (
        "\n\nEach revision's service runs with its own defaults; `cpu_ms_per_doc` is the "
        "server's process tree (from /proc) over the documents answered. Above one client "
        "the servers take turns in an order reversed every other turn, and "
        "`docs_per_s_vs_naive` is the median over the turns of each turn's docs/s over the "
        "naive server's in the same turn, `p99_vs_naive` the same for p99."
        + (
            f" At one client the servers take turns every {args.block} emails within each "
            "turn, and `ms_per_email_vs_naive` is the median over the emails of each one's "
            "latency less the naive server's for the same email."
            if args.block and 1 in args.clients
            else ""
        )
    )
    write_fragment(
        out, "changes", "Before and after: the request path, change by change",
        command_line("bench.changes", argv), facts, body, False, started,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
