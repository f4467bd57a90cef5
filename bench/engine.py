"""Engines over the test split: PyTorch eager fp32, ONNX Runtime fp32 and int8 on the CPU (fp16 on
CUDA where present): documents/s, tokens/s, spam F1 at config.json's threshold, and the achieved
GFLOP/s against this machine's measured matrix-multiply peak.

Every engine sees the same head-truncated windows (the first n_max tokens) in the same
length-sorted batches the service forms by default (at most 32 documents, 16,384 padded tokens).

    python -m bench.engine [--quick] [--model-dir DIR]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    base_parser,
    check_target,
    command_line,
    encode,
    f1_score,
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
from bench.ortprofile import profile_ops
from bench.peak import gemm_peaks, split_peaks
from bench.runners import (
    Runner,
    batches,
    flops_per_token,
    offline_docs_per_s,
    ort_runner,
    torch_runner,
)
from service.artifact import MODEL_FILES, flag_scores, pad_batch, softmax

# (engine, precision, batched): PyTorch runs the checkpoint, the others the artifact's ONNX files.
ENGINES = [
    ("PyTorch eager fp32", "fp32", True),
    ("ONNX Runtime fp32", "fp32", True),
    ("ONNX Runtime int8", "int8", True),
    ("ONNX Runtime int8, one document per run", "int8", False),
    ("ONNX Runtime fp16 (CUDA)", "fp16", True),
]


def make_runner(name: str, precision: str, model_dir: Path, threads: int) -> Runner | None:
    if name.startswith("PyTorch"):
        return torch_runner(model_dir, threads)
    return ort_runner(model_dir, precision, threads, cuda=precision == "fp16")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = base_parser("python -m bench.engine", __doc__ or "")
    p.add_argument("--docs", type=int, help="test documents (default 300 quick, all otherwise)")
    p.add_argument("--passes", type=int, help="timed passes per engine (default 1 / 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    docs = args.docs if args.docs is not None else (300 if args.quick else 0)
    passes = args.passes or (1 if args.quick else 3)
    started, out = machine(), out_dir(args)
    cfg = read_config(args.model_dir)
    n_max, pad_id = cfg["n_max"], cfg.get("pad_id", 0)
    labels, flag_labels, threshold = cfg["labels"], cfg["flag_labels"], float(cfg["threshold"])

    examples = load_test_split(args.data, docs)
    t0 = time.perf_counter()
    full_ids = encode(args.model_dir, [e.text for e in examples])
    tokenize_s = time.perf_counter() - t0
    seqs = [s[:n_max] or [pad_id] for s in full_ids]
    truth = [e.label in flag_labels for e in examples]
    real_tokens = sum(len(s) for s in seqs)
    fpt = flops_per_token(cfg["d_model"], cfg["n_layers"], cfg["d_ff"], cfg["k"])
    print(
        f"{len(seqs)} documents, {real_tokens} tokens after head truncation to {n_max}; "
        f"{fpt / 1e6:.2f} MFLOP per token; measuring matrix-multiply peaks ...",
        flush=True,
    )
    peaks = gemm_peaks(args.threads, quick=args.quick)
    fp32_peak, int8_peak = split_peaks(peaks)

    rows, results = [], {}
    for name, precision, batched in ENGINES:
        unmeasured = [name, *[float("nan")] * 6]
        if precision == "fp16" and not (args.model_dir / MODEL_FILES["fp16"]).exists():
            rows.append([*unmeasured, f"skipped: no {MODEL_FILES['fp16']}"])
            continue
        try:
            run = make_runner(name, precision, args.model_dir, args.threads)
        except Exception as e:  # ONNX Runtime and the checkpoint loader raise their own types
            rows.append([*unmeasured, f"failed to load: {str(e).splitlines()[0][:160]}"])
            print(f"{name:>42}  {rows[-1][-1]}")
            continue
        if run is None:
            rows.append([*unmeasured, "skipped: no CUDA device in use"])
            print(f"{name:>42}  skipped (no CUDA device in use)")
            continue
        rate, logits, padded, secs = offline_docs_per_s(run, seqs, pad_id, passes, batched)
        f1 = f1_score(list(flag_scores(softmax(logits), labels, flag_labels)), truth, threshold)
        gflops = padded * fpt / secs / 1e9
        peak = int8_peak if precision == "int8" else fp32_peak
        results[name] = {"docs_per_s": rate, "f1": f1}
        rows.append(
            [
                name,
                rate,
                rate * real_tokens / len(seqs),
                f1,
                gflops,
                100 * gflops / peak if peak else float("nan"),
                real_tokens / padded,
                "ok",
            ]
        )
        print(f"{name:>42}  {rate:8.1f} docs/s  F1 {f1:.4f}  {gflops:7.1f} GFLOP/s", flush=True)
        del run

    plan = batches(seqs)
    sample = [pad_batch([seqs[i] for i in idx], pad_id) for idx in plan[:: 8 if args.quick else 2]]
    prof_rows = [
        [precision, *op]
        for precision in ("fp32", "int8")
        for op in profile_ops(args.model_dir / MODEL_FILES[precision], sample, args.threads)
    ]
    headers = [
        "engine",
        "docs_per_s",
        "tokens_per_s",
        "spam_f1",
        "gflop_per_s",
        "pct_of_peak",
        "real_over_padded",
        "status",
    ]
    write_csv(out / "engine.csv", headers, rows)
    plot(rows, peaks, out / "engine.png")
    base = results.get("PyTorch eager fp32", {})
    targets = []
    for name, bound in (("ONNX Runtime int8", 3.0), ("ONNX Runtime fp32", 1.2)):
        got = results.get(name, {})
        speed = got.get("docs_per_s", float("nan")) / base.get("docs_per_s", float("nan"))
        targets.append(
            [
                f"{name} >= {bound}x PyTorch eager fp32 documents/s",
                f"{speed:.2f}x",
                check_target(speed, bound),
            ]
        )
    drop = 100 * (
        base.get("f1", float("nan")) - results.get("ONNX Runtime int8", {}).get("f1", float("nan"))
    )
    targets.append(
        [
            "int8 spam-F1 drop <= 0.5 points",
            f"{drop:+.2f} points",
            check_target(drop, 0.5, at_least=False),
        ]
    )
    peak_rows = [[k, v] for k, v in peaks.items()]
    body = "\n\n".join(
        [
            markdown_table(headers, rows),
            "Matrix-multiply peak of this machine (GFLOP/s, or GOP/s for int8; best of repeated "
            "square products):",
            markdown_table(["kernel", "gflop_per_s"], peak_rows),
            "Achieved GFLOP/s counts the matrix products of every padded token the engine computed "
            f"({fpt / 1e6:.2f} MFLOP per token, analytically; see `flops_per_token`); int8 rows are "
            "compared with the int8 peak although attention's activation products stay fp32.",
            "Targets:",
            markdown_table(["target", "measured", "status"], targets),
            f"Where ONNX Runtime's time goes (its profiler, kernel time by operator type, over "
            f"{len(sample)} of the {len(plan)} batches):",
            markdown_table(["model", "operator", "ms", "share_pct"], prof_rows),
            "![engines](engine.png)",
        ]
    )
    facts = {
        "Model": f"{args.model_dir.name}: d_model {cfg['d_model']}, {cfg['n_layers']} layers, "
        f"k {cfg['k']}, n_max {n_max}, threshold {threshold} ({cfg.get('data', {}).get('source')})",
        "Documents": f"{len(seqs)} test documents, {real_tokens:,} tokens after head truncation; "
        f"tokenizing them took {tokenize_s:.2f} s ({len(seqs) / tokenize_s:,.0f} docs/s, one thread)",
        "Threads": f"{args.threads}; {passes} timed pass(es) per engine, median",
        "Software": versions("torch", "onnxruntime", "numpy"),
    }
    path = write_fragment(
        out,
        "engine",
        "Engines: PyTorch vs ONNX Runtime fp32 / int8",
        command_line("bench.engine", argv),
        facts,
        body,
        args.quick,
        started,
    )
    print(
        "\n"
        + markdown_table(headers, rows)
        + "\n\n"
        + markdown_table(["target", "measured", "status"], targets)
    )
    print(f"\nwrote {path}, engine.csv and engine.png in {out}")
    return 0


def plot(rows: list[list[Any]], peaks: dict[str, float], path: Path) -> None:
    plt = pyplot()
    ok = [r for r in rows if r[-1] == "ok"]
    names = [
        r[0].replace("ONNX Runtime", "ORT").replace(", one document per run", "\nbatch 1")
        for r in ok
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    axes[0].barh(names, [r[1] for r in ok], color="tab:blue")
    axes[0].set(xlabel="documents / s", title="throughput over the test split")
    axes[1].barh(names, [r[4] for r in ok], color="tab:orange", label="achieved")
    for i, (kernel, value) in enumerate(peaks.items()):
        axes[1].axvline(value, linestyle="--", color=f"C{i + 2}", label=f"peak {kernel}")
    axes[1].set(xlabel="GFLOP/s", title="achieved vs matrix-multiply peak", xscale="log")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
