"""Attention scaling: the Linformer at the shipped sizes (k=128 and 256) against the same model with
full attention, batch 1, n = 512 ... 32,768: latency and peak memory in PyTorch and ONNX Runtime,
with the Linformer paper's Table 3 ratios beside ours. Each point runs in its own process
(bench/attention_point.py); points that would not fit in memory are skipped and say so.

    python -m bench.attention [--quick] [--model-dir DIR]
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from bench.attention_point import ORT_VARIANTS, VARIANTS, estimate_gib
from bench.common import (
    BENCH_DIR,
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

SIZE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "sharing")
FULL_NS = [512, 1024, 2048, 4096, 8192, 16384, 32768]
QUICK_NS = [512, 1024, 2048, 4096]
NAN = float("nan")

# Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity" (arXiv:2006.04768),
# Table 3: inference time and memory saved over a Transformer, k = 128 and 256. Measured on a
# 16 GB V100 with the largest batch that fits, so the memory figure is a batch-size ratio.
PAPER_SPEEDUP = {
    512: (1.5, 1.3), 1024: (1.7, 1.6), 2048: (2.6, 2.4), 4096: (3.4, 3.2),
    8192: (5.5, 5.0), 16384: (8.6, 7.8), 32768: (13.0, 12.0), 65536: (20.0, 18.0),
}  # fmt: skip
PAPER_MEMORY = {
    512: (1.7, 1.5), 1024: (3.0, 2.9), 2048: (6.1, 5.6), 4096: (14.0, 13.0),
    8192: (28.0, 26.0), 16384: (56.0, 48.0), 32768: (56.0, 48.0), 65536: (60.0, 52.0),
}  # fmt: skip

# Ratio columns: (label, full-attention variant, Linformer variant, runtime).
RATIOS = [
    ("PyTorch k=128", "full", "linformer-k128", "pytorch"),
    ("PyTorch k=256", "full", "linformer-k256", "pytorch"),
    ("PyTorch (math) k=128", "full-math", "linformer-k128", "pytorch"),
    ("PyTorch (math) k=256", "full-math", "linformer-k256", "pytorch"),
    ("ORT k=128", "full", "linformer-k128", "onnxruntime"),
    ("ORT k=256", "full", "linformer-k256", "onnxruntime"),
]
RATIO_HEADERS = ["n", *(r[0] for r in RATIOS), "paper k=128", "paper k=256"]
# The targets: (what, ratio key, n, bound).
TARGETS = [
    ("k=128 >= 2.5x faster at n=4,096", "latency_ms", 4096, 2.5),
    ("k=128 >= 8x faster at n=16,384", "latency_ms", 16384, 8.0),
    ("k=128 peak memory >= 10x lower at n=16,384", "peak_mib", 16384, 10.0),
]


def export_variants(sizes: dict[str, Any], n_max: int, tmp: Path) -> dict[str, str]:
    """One ONNX file per variant, dynamic in length up to the largest n of the sweep."""
    import torch

    from export.onnx_export import DEFAULT_OPSET, export_fp32
    from model.config import ModelConfig
    from model.linformer import LinformerClassifier

    files = {}
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # optional-package notices
    for variant in ORT_VARIANTS:
        torch.manual_seed(0)
        cfg = ModelConfig(**sizes, **VARIANTS[variant], n_max=n_max, dropout=0.0)
        path = tmp / f"{variant}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on dynamic axis names
            export_fp32(LinformerClassifier(cfg).eval(), path, DEFAULT_OPSET)
        files[variant] = str(path)
    return files


def measure(point: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one point in a fresh process; its result, or why there is none."""
    cmd = [sys.executable, "-m", "bench.attention_point", json.dumps(point)]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=BENCH_DIR.parent
        )
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout:.0f} s"}
    if done.returncode != 0:
        why = "out of memory (killed)" if done.returncode in (-9, 137) else "failed"
        tail = done.stderr.strip().splitlines()[-1:] or [""]
        return {"status": f"{why}: {tail[0][:120]}"}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "status": "ok"}


def sweep(args: Any, sizes: dict[str, Any], ns: list[int]) -> list[dict[str, Any]]:
    limit = args.max_memory_gib or 0.7 * machine()["available_gib"]
    points = [(v, "pytorch") for v in VARIANTS] + [(v, "onnxruntime") for v in ORT_VARIANTS]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        print(f"exporting {len(ORT_VARIANTS)} ONNX variants (n_max {max(ns)}) ...", flush=True)
        onnx_files = export_variants(sizes, max(ns), Path(tmp))
        for variant, runtime in points:
            for n in ns:
                row: dict[str, Any] = {"variant": variant, "runtime": runtime, "n": n}
                est = estimate_gib(variant, runtime, n, sizes["n_heads"])
                if est > limit:
                    row["status"] = f"skipped: needs ~{est:.0f} GiB, limit {limit:.0f}"
                else:
                    point = {**row, "sizes": sizes, "threads": args.threads}
                    point |= {"repeats": args.repeats, "onnx": onnx_files.get(variant)}
                    row |= measure(point, args.point_timeout)
                rows.append(row)
                print(
                    f"{variant:>15} {runtime:>11} n={n:>6}  {row.get('latency_ms', NAN):9.1f} ms"
                    f"  {row.get('peak_mib', NAN):9.1f} MiB  {row['status']}",
                    flush=True,
                )
    return rows


def ratio_table(rows: list[dict[str, Any]], ns: list[int], key: str) -> list[list[Any]]:
    """Full attention's `key` over the Linformer's, per n and column of RATIOS; paper beside."""
    got = {(r["variant"], r["runtime"], r["n"]): r.get(key, NAN) for r in rows}
    paper = PAPER_SPEEDUP if key == "latency_ms" else PAPER_MEMORY
    table = []
    for n in ns:
        cells = []
        for _, full, lin, runtime in RATIOS:
            a, b = got.get((full, runtime, n), NAN), got.get((lin, runtime, n), NAN)
            cells.append(a / b if b else NAN)
        table.append([n, *cells, *paper.get(n, (NAN, NAN))])
    return table


def target_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """Each target for the PyTorch default kernel and ONNX Runtime: measured and status."""
    out = []
    for what, key, n, bound in TARGETS:
        by_n = {r[0]: r for r in ratio_table(rows, [n], key)}
        pt, ort_ = by_n[n][1], by_n[n][5]
        status = f"{check_target(pt, bound)} / {check_target(ort_, bound)}"
        shown = " / ".join("–" if math.isnan(v) else f"{v:.2f}" for v in (pt, ort_))
        out.append([what, shown, status])
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant, runtime in sorted({(r["variant"], r["runtime"]) for r in rows}):
        pts = [
            r for r in rows if (r["variant"], r["runtime"], r["status"]) == (variant, runtime, "ok")
        ]
        style = "-" if runtime == "pytorch" else "--"
        for ax, key in zip(axes, ("latency_ms", "peak_mib"), strict=True):
            xs, ys = [r["n"] for r in pts], [r[key] for r in pts]
            ax.plot(xs, ys, style, marker="o", label=f"{variant} ({runtime})")
    titles = ("latency, batch 1 (ms)", "peak memory over baseline (MiB)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set(xscale="log", yscale="log", xlabel="sequence length n", title=title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = base_parser("python -m bench.attention", __doc__ or "")
    p.add_argument("--n", type=int, nargs="+", help="sequence lengths (default by mode)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, help="timed runs after the first (default 2 / 5)")
    p.add_argument("--max-memory-gib", type=float, help="skip points estimated above this")
    p.add_argument("--point-timeout", type=float, help="seconds per point (default 180 / 1800)")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.point_timeout = args.point_timeout or (180 if args.quick else 1800)
    ns = args.n or (QUICK_NS if args.quick else FULL_NS)
    started, out = machine(), out_dir(args)
    from model.config import ModelConfig

    config, defaults = read_config(args.model_dir), ModelConfig()
    sizes = {k: config.get(k, getattr(defaults, k)) for k in SIZE_KEYS}
    rows = sweep(args, sizes, ns)

    headers = ["variant", "runtime", "n", "latency_ms", "peak_mib", "status"]
    table = [[r.get(h, NAN) for h in headers] for r in rows]
    write_csv(out / "attention.csv", headers, table)
    plot(rows, out / "attention.png")
    speed, mem = ratio_table(rows, ns, "latency_ms"), ratio_table(rows, ns, "peak_mib")
    body = "\n\n".join(
        [
            "Latency (median of the warm runs) and peak memory per point:",
            markdown_table(headers, table),
            "Speed-up of the Linformer over full attention (full latency / Linformer latency). "
            "PyTorch's default SDPA kernel on the CPU is fused and never holds the n x n scores; "
            '"math" forces the unfused kernel that does, as the paper\'s 2020 baseline did. '
            "The paper's Table 3 beside:",
            markdown_table(RATIO_HEADERS, speed),
            "Peak memory of full attention over the Linformer's (the paper's figure is the ratio "
            "of the largest batches that fit on a 16 GB V100, not a batch-1 peak):",
            markdown_table(RATIO_HEADERS, mem),
            "Targets (PyTorch default kernel / ONNX Runtime):",
            markdown_table(["target", "measured", "status"], target_rows(rows)),
            "![attention scaling](attention.png)",
        ]
    )
    facts = {
        "Model": ", ".join(f"{k} {sizes[k]}" for k in SIZE_KEYS) + ", random weights, batch 1",
        "Threads": f"{args.threads} (torch.set_num_threads and ORT intra-op)",
        "Software": versions("torch", "onnxruntime", "numpy"),
        "Paper figures": "Wang et al. 2020, arXiv:2006.04768, Table 3 (k = 128 and 256)",
    }
    title = "Attention scaling: Linformer vs full attention"
    command = command_line("bench.attention", argv)
    path = write_fragment(out, "attention", title, command, facts, body, args.quick, started)
    print("\n" + markdown_table(RATIO_HEADERS, speed) + "\n\n" + markdown_table(RATIO_HEADERS, mem))
    print(f"\nwrote {path}, attention.csv and attention.png in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
