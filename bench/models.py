"""Shipped models side by side, in one run on one machine: offline documents/s per precision
(ONNX Runtime on the CPU, the service's default batches and one document per run) and spam F1.

    python -m bench.models [--quick] [--models DIR DIR ...] [--docs N] [--passes N]

The first model is the reference of the speed ratios.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bench.common import (
    base_parser,
    command_line,
    encode,
    f1_score,
    load_test_split,
    machine,
    markdown_table,
    out_dir,
    read_config,
    write_csv,
    write_fragment,
)
from bench.runners import offline_docs_per_s, ort_runner
from service.artifact import CONFIG_FILE, MODEL_FILES, flag_scores, softmax

ARTIFACTS = Path(__file__).resolve().parents[1] / "model" / "artifacts"
# fp16 is the GPU file; on the CPU provider it runs, slower than int8, and is measured as such.
PRECISIONS = ("fp32", "int8", "fp16")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = base_parser("python -m bench.models", __doc__ or "")
    p.add_argument("--models", type=Path, nargs="+", help="artifact directories (default: all)")
    p.add_argument("--docs", type=int, help="test documents (default 300 quick, all otherwise)")
    p.add_argument("--passes", type=int, help="timed passes (default 1 quick, 3 otherwise)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    models = args.models or sorted(d for d in ARTIFACTS.iterdir() if (d / CONFIG_FILE).exists())
    docs = args.docs if args.docs is not None else (300 if args.quick else 0)
    passes = args.passes or (1 if args.quick else 3)
    started, out = machine(), out_dir(args)
    examples = load_test_split(args.data, docs)
    rows, reference = [], {}
    for model_dir in models:
        cfg = read_config(model_dir)
        n_max, pad_id = cfg["n_max"], cfg.get("pad_id", 0)
        seqs = [s[:n_max] or [pad_id] for s in encode(model_dir, [e.text for e in examples])]
        truth = [e.label in cfg["flag_labels"] for e in examples]
        for precision in [p for p in PRECISIONS if (model_dir / MODEL_FILES[p]).exists()]:
            for batched in (True, False):
                run = ort_runner(model_dir, precision, args.threads)
                assert run is not None
                rate, logits, _, _ = offline_docs_per_s(run, seqs, pad_id, passes, batched)
                scores = flag_scores(softmax(logits), cfg["labels"], cfg["flag_labels"])
                f1 = f1_score(list(scores), truth, float(cfg["threshold"]))
                key = (precision, batched)
                reference.setdefault(key, rate)
                rows.append(
                    [
                        cfg.get("name", model_dir.name),
                        precision,
                        "batches" if batched else "one per run",
                        rate,
                        rate / reference[key],
                        sum(len(s) for s in seqs) / len(seqs),
                        f1,
                    ]
                )
                print(
                    f"{rows[-1][0]:>36} {precision} {rows[-1][2]:>11}: {rate:8.1f} docs/s "
                    f"({rows[-1][4]:.2f}x)  F1 {f1:.4f}",
                    flush=True,
                )
                del run
    headers = ["model", "precision", "schedule", "docs_per_s", "vs_first", "tokens_per_doc", "f1"]
    write_csv(out / "models.csv", headers, rows)
    write_fragment(
        out,
        "models",
        "Shipped models side by side (offline, ONNX Runtime, CPU)",
        command_line("bench.models", argv),
        {
            "Documents": f"{len(examples)} from the test split, head-truncated to each model's n_max",
            "Threads": str(args.threads),
            "Passes": f"median of {passes}",
        },
        markdown_table(headers, rows)
        + "\n\n`vs_first`: docs/s against the first model at the same precision and schedule. "
        "F1 at each model's own config.json threshold, on these documents.",
        args.quick,
        started,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
