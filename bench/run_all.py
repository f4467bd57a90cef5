"""Run every benchmark, each in its own process, and assemble RESULTS.md from their fragments.

    python -m bench.run_all [--quick] [--model-dir DIR] [--data DIR] [--only attention engine]

A full run writes bench/results/ and bench/RESULTS.md; a quick run writes bench/results/quick/
and its own RESULTS.md there, so quick figures never land in the committed report.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    BENCH_DIR,
    DEFAULT_DATA_DIR,
    DEFAULT_MODEL_DIR,
    QUICK_DIR,
    RESULTS_DIR,
    machine,
    machine_line,
    markdown_table,
)
from service.artifact import CONFIG_FILE

BENCHMARKS = {
    "attention": "Linformer vs full attention, batch 1, n = 512 ... 32,768",
    "engine": "PyTorch eager vs ONNX Runtime fp32 / int8 over the test split",
    "costgrid": "the engine's cost by batch shape and the batching policy it implies",
    "load": "the service, a naive server, LitServe and Ray Serve under load; a batch job",
    "paired": "one client: the service and the naive server alternating every 50 documents",
}
IMAGE = re.compile(r"\]\(([\w.-]+\.png)\)")


def relink(fragment: str, prefix: str) -> str:
    """Point a fragment's image links (relative to the fragment) at `prefix/`."""
    if prefix in ("", "."):
        return fragment
    return IMAGE.sub(lambda m: f"]({prefix}/{m.group(1)})", fragment)


def assemble(
    fragments: Path, dest: Path, runs: dict[str, tuple[int, float]], quick: bool, command: str
) -> str:
    """RESULTS.md: how it was made, a line per benchmark, then every fragment in order."""
    prefix = Path(os.path.relpath(fragments, dest.parent)).as_posix()
    rows = []
    for name, what in BENCHMARKS.items():
        rc, seconds = runs.get(name, (None, float("nan")))
        if rc is None:
            state = "earlier run" if (fragments / f"{name}.md").exists() else "not run"
        else:
            state = "ok" if rc == 0 else f"failed (exit {rc})"
        took = "–" if rc is None else f"{seconds / 60:.1f} min"
        rows.append([f"[{name}](#{name})", what, state, took])
    parts = [
        "# Benchmark results",
        "",
        "Quick mode: these figures check that the scripts run; they are not results."
        if quick
        else "Each section was written by its script; the figures, date, machine and command "
        "of every run are in it. Where a target of the benchmarks issue is missed, the section "
        "says by how much.",
        "",
        f"- Assembled: {time.strftime('%Y-%m-%d %H:%M %Z')} by `{command}`",
        # Sections run earlier may come from other machines: each names its own.
        f"- Assembled on: {machine_line(machine())} (each section names the machine its "
        "figures come from)",
        "",
        markdown_table(["benchmark", "what", "this run", "took"], rows),
        "",
    ]
    for name in BENCHMARKS:
        path = fragments / f"{name}.md"
        parts.append(f'<a id="{name}"></a>')
        parts.append("")
        if path.exists():
            parts.append(relink(path.read_text(encoding="utf-8"), prefix).strip())
        else:
            parts.append(f"## {name}\n\nNo results yet: run `python -m bench.{name}`.")
        parts.append("")
    # The reading of the figures (why a target is missed, what the profile shows) is written by
    # hand after a full run; it is kept out of quick reports.
    analysis = BENCH_DIR / "ANALYSIS.md"
    if not quick and analysis.exists():
        parts += [analysis.read_text(encoding="utf-8").strip(), ""]
    text = "\n".join(parts)
    dest.write_text(text, encoding="utf-8")
    return text


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__)
    p.add_argument("--quick", action="store_true", help="each benchmark's quick mode")
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run just these")
    p.add_argument(
        "--assemble-only", action="store_true", help="rebuild RESULTS.md from existing fragments"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    fragments = QUICK_DIR if args.quick else RESULTS_DIR
    dest = fragments / "RESULTS.md" if args.quick else BENCH_DIR / "RESULTS.md"
    if not args.assemble_only and not (args.model_dir / CONFIG_FILE).exists():
        print(
            f"bench.run_all: {args.model_dir} holds no model artifact; pass --model-dir "
            "(python -m bench.random_artifact --out DIR builds a random-weight one)",
            file=sys.stderr,
        )
        return 2
    fragments.mkdir(parents=True, exist_ok=True)
    common = ["--model-dir", str(args.model_dir), "--data", str(args.data)]
    common += ["--quick"] if args.quick else []
    runs: dict[str, tuple[int, float]] = {}
    for name in [] if args.assemble_only else (args.only or list(BENCHMARKS)):
        print(f"== bench.{name} {' '.join(common)}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.run(
            [sys.executable, "-m", f"bench.{name}", *common], cwd=BENCH_DIR.parent
        ).returncode
        runs[name] = (rc, time.monotonic() - t0)
        print(f"== bench.{name}: exit {rc} after {runs[name][1]:.0f} s", flush=True)
    command = "python -m bench.run_all" + (" " + " ".join(argv) if argv else "")
    assemble(fragments, dest, runs, args.quick, command)
    print(f"wrote {dest}")
    return max((rc for rc, _ in runs.values()), default=0)


if __name__ == "__main__":
    sys.exit(main())
