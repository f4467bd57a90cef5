"""One client, the service against the naive server, alternating in small blocks of documents.

`bench.load` times each server for a whole level in turn (400 documents), so a machine whose
speed drifts by a few per cent between turns moves one client's p50 ratio by as much. Here the
two servers take turns every `--block` documents, each block's order alternating, and every
document goes to both: the ratio of p50s, the median per-document difference, and a bootstrap
interval over blocks say whether one client's latency differs at all, and by how much per
document length.

With `--text`, every request carries that one text instead of a test email: a short text's
engine run is brief, so the two servers' latencies then differ by what each adds around it.

    python -m bench.paired --model-dir DIR [--passes 4] [--block 50] [--text "hello world"]
"""

from __future__ import annotations

import contextlib
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench import loadgen
from bench.common import (
    add_service_flag,
    base_parser,
    command_line,
    load_test_split,
    machine,
    markdown_table,
    out_dir,
    read_config,
    versions,
    write_csv,
    write_fragment,
)

BUCKETS = ((0, 1000), (1000, 4096), (4096, None))  # characters


def timed(client: httpx.Client, text: str) -> float:
    """Seconds for one classify request (the load benchmark's request: the head window)."""
    start = time.perf_counter()
    response = client.post("/v1/classify", json={"input": text, "long_document": "truncate"})
    seconds = time.perf_counter() - start
    response.raise_for_status()
    return seconds


def run_pairs(
    urls: dict[str, str],
    texts: list[str],
    passes: int,
    block: int,
    transport: httpx.BaseTransport | None = None,
) -> list[tuple[int, int, float, float]]:
    """(block index, characters, service seconds, naive seconds) per document and pass."""
    rows: list[tuple[int, int, float, float]] = []
    clients = {
        name: httpx.Client(base_url=url, timeout=120, transport=transport)
        for name, url in urls.items()
    }
    try:
        for name in clients:  # warm the connections and the servers' caches
            for text in texts[:40]:
                timed(clients[name], text)
        index = 0
        for p in range(passes):
            for b, start in enumerate(range(0, len(texts), block)):
                chunk = texts[start : start + block]
                order = ["service", "naive"] if (b + p) % 2 else ["naive", "service"]
                got: dict[str, list[float]] = {}
                for name in order:
                    time.sleep(0.2)  # the previous server's threads settle
                    got[name] = [timed(clients[name], text) for text in chunk]
                for text, s, n in zip(chunk, got["service"], got["naive"], strict=True):
                    rows.append((index, len(text), s, n))
                index += 1
    finally:
        for client in clients.values():
            client.close()
    return rows


def bootstrap_ratio(rows: list[tuple[int, int, float, float]], draws: int = 2000) -> list[float]:
    """The 2.5th and 97.5th percentiles of the p50 ratio, resampling whole blocks."""
    blocks: dict[int, list[tuple[float, float]]] = {}
    for index, _, s, n in rows:
        blocks.setdefault(index, []).append((s, n))
    keys = list(blocks)
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(draws):
        pick = rng.choice(len(keys), size=len(keys), replace=True)
        pairs = np.array([pair for i in pick for pair in blocks[keys[i]]])
        ratios.append(float(np.median(pairs[:, 0]) / np.median(pairs[:, 1])))
    return [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))]


def summary(rows: list[tuple[int, int, float, float]]) -> list[list[Any]]:
    """Per length bucket and overall: documents, p50s, ratio, median paired difference."""
    out = []
    for lo, hi in (*BUCKETS, (0, None)):
        sel = [r for r in rows if r[1] >= lo and (hi is None or r[1] < hi)]
        if not sel:
            continue
        s = statistics.median(r[2] for r in sel) * 1000
        n = statistics.median(r[3] for r in sel) * 1000
        diff = statistics.median(r[2] - r[3] for r in sel) * 1000
        label = "all" if (lo, hi) == (0, None) else f"{lo}-{hi - 1}" if hi else f">= {lo}"
        out.append([label, len(sel), round(s, 2), round(n, 2), round(s / n, 3), round(diff, 3)])
    return out


def workload(data: Path, docs: int, text: str | None) -> list[str]:
    """`docs` test emails in the load benchmark's order, or `docs` copies of `text`."""
    if text is not None:
        return [text] * docs
    texts = [e.text for e in load_test_split(data, docs)]
    random.Random(0).shuffle(texts)  # the load benchmark's order: long and short mixed
    return texts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = base_parser("python -m bench.paired", (__doc__ or "").splitlines()[0])
    p.add_argument("--precision", choices=["fp32", "int8", "fp16"], default="int8")
    p.add_argument(
        "--docs", type=int, help="test emails, or copies of --text (default 100 quick, 400)"
    )
    p.add_argument("--passes", type=int, help="times every email goes to each server (1 quick, 4)")
    p.add_argument("--block", type=int, default=50, help="documents per turn (default 50)")
    p.add_argument(
        "--text",
        help="send this text in every request instead of the test emails (--docs of them): "
        "what each server adds around a short engine run",
    )
    add_service_flag(p)
    args = p.parse_args(argv)
    if args.block < 1:
        p.error("--block must be at least 1")
    if args.text is not None and not args.text.strip():
        p.error("--text must not be empty")
    docs = args.docs if args.docs is not None else (100 if args.quick else 400)
    passes = args.passes or (1 if args.quick else 4)
    started, out = machine(), out_dir(args)
    read_config(args.model_dir)  # a clear error for a folder that is not an artifact
    texts = workload(args.data, docs, args.text)

    with tempfile.TemporaryDirectory() as tmp:
        ports = {"service": loadgen.free_port(), "naive": loadgen.free_port()}
        commands = {
            "service": loadgen.service_command(
                args.model_dir, ports["service"], args.precision, Path(tmp) / "jobs.db",
                *args.service_flag,
            ),
            "naive": loadgen.naive_command(args.model_dir, ports["naive"], args.precision),
        }  # fmt: skip
        with contextlib.ExitStack() as stack:
            urls = {}
            for name, cmd in commands.items():
                url = f"http://127.0.0.1:{ports[name]}"
                stack.enter_context(loadgen.ServerProcess(cmd, url, Path(tmp) / f"{name}.log"))
                urls[name] = url
            rows = run_pairs(urls, texts, passes, args.block)

    table = summary(rows)
    low, high = bootstrap_ratio(rows)
    headers = ["characters", "documents", "service p50 ms", "naive p50 ms", "ratio",
               "median difference ms"]  # fmt: skip
    write_csv(out / "paired.csv", headers, table)
    overall = table[-1]
    verdict = (
        f"One client, {len(rows)} requests to each server: p50 {overall[2]} ms against the naive "
        f"server's {overall[3]} ms, a ratio of {overall[4]} (95% bootstrap interval over blocks "
        f"{low:.3f} to {high:.3f}); the median per-document difference is {overall[5]} ms."
    )
    sent = (
        f"{len(texts)} test emails (shuffled once, seed 0)"
        if args.text is None
        else f"{len(texts)} copies of the text {args.text!r}"
    )
    facts = {
        "Model": f"{args.model_dir.name}, precision {args.precision}",
        "Workload": f"{sent}, {passes} passes, servers alternating every {args.block} "
        "documents, each text sent to both",
        "Service flags": " ".join(args.service_flag) or "defaults",
        "Software": versions("onnxruntime", "fastapi", "uvicorn", "httpx"),
    }
    body = f"{markdown_table(headers, table)}\n\n{verdict}\n"
    path = write_fragment(
        out, "paired", "One client, paired with the naive server", command_line("bench.paired", argv),
        facts, body, args.quick, started,
    )  # fmt: skip
    print(body)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
