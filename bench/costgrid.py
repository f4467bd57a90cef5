"""The engine's cost over batch shapes, measured the way the service's warm-up does, and the
batching policy it implies: the table that decides, on this host, whether windows share runs.

On a CPU it also times a run alone on every core (the service's solo session). On a CUDA host,
`--device cuda --precision fp16` records the GPU's grid with one command (and
`pytest -m gpu tests/bench/test_costgrid.py` checks that batching is chosen there).

    python -m bench.costgrid [--device cpu|cuda] [--precision int8|fp32|fp16]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bench.common import (
    base_parser,
    command_line,
    machine,
    markdown_table,
    out_dir,
    pyplot,
    versions,
    write_csv,
    write_fragment,
)
from service.costmodel import CostModel
from service.engine import OnnxEngine

HEADERS = ["length", "batch", "ms_per_run", "ms_per_window", "windows_per_s", "gain_over_batch_1"]


def measure(args: Any) -> tuple[OnnxEngine, CostModel]:
    engine = OnnxEngine.load(
        args.model_dir, device=args.device, precision=args.precision, workers=args.workers
    )
    model = CostModel.calibrate(
        engine.run, engine.config.pad_id, n_max=engine.config.n_max,
        max_batch_tokens=args.max_batch_tokens, max_batch_size=args.max_batch_size,
        budget_s=args.budget_s, repeats=args.repeats,
    )  # fmt: skip
    return engine, model


def rows_of(model: CostModel) -> list[list[Any]]:
    rows = []
    for (batch, length), seconds in sorted(model.points.items(), key=lambda kv: kv[0][::-1]):
        single = model.points.get((1, length), seconds)
        rows.append(
            [length, batch, 1000 * seconds, 1000 * seconds / batch, batch / seconds,
             batch * single / seconds]
        )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = base_parser("python -m bench.costgrid", __doc__ or "")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    p.add_argument("--precision", choices=["auto", "fp32", "int8", "fp16"], default="auto")
    p.add_argument("--workers", type=int, default=0, help="engine runs at once (0: as served)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--repeats", type=int, help="timed runs per shape (default 2 quick, 5)")
    p.add_argument("--budget-s", type=float, default=120.0)
    args = p.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 5)
    started, out = machine(), out_dir(args)
    engine, model = measure(args)
    policy = model.policy("auto")
    rows = rows_of(model)
    write_csv(out / "costgrid.csv", HEADERS, rows)
    plot(rows, out / "costgrid.png")
    body = "\n\n".join(
        [
            markdown_table(HEADERS, rows),
            f"Calibration took {model.calibration_s:.1f} s. Batching gain by length (batches' "
            "windows/s over one window per run, the median over batch sizes): "
            + ", ".join(f"{n}: {g:.2f}x" for n, g in model.gains().items())
            + ".",
            f"Policy for `--batching auto`: **{'batch' if policy.batching else 'one per run'}**"
            f" ({policy.reason}).",
            "The service times the same grid at warm-up on the session it serves with and "
            "shows it in `/info` (`batching.cost_model`) and in `linmod_engine_cost_seconds`.",
            "![cost grid](costgrid.png)",
        ]
    )
    facts = {
        "Model": f"{args.model_dir.name}, precision {engine.precision}, provider "
        f"{engine.provider}, {engine.workers} engine worker(s)",
        "Grid": f"batch 1 ... {args.max_batch_size}, length 32 ... n_max, at most "
        f"{args.max_batch_tokens:,} padded tokens; median of {args.repeats} runs per shape",
        "Software": versions("onnxruntime", "numpy"),
    }
    path = write_fragment(
        out, "costgrid", "Engine cost by batch shape, and the batching policy",
        command_line("bench.costgrid", argv), facts, body, args.quick, started,
    )  # fmt: skip
    print(markdown_table(HEADERS, rows))
    print(f"\npolicy: {policy.reason}\nwrote {path}")
    return 0


def plot(rows: list[list[Any]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for length in sorted({r[0] for r in rows}):
        pts = [r for r in rows if r[0] == length]
        ax.plot([r[1] for r in pts], [r[4] for r in pts], marker="o", label=f"length {length}")
    ax.set(xscale="log", yscale="log", xlabel="windows per run", ylabel="windows / s",
           title="engine throughput by batch shape")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
