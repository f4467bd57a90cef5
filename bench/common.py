"""What every benchmark shares: arguments, the machine line, tables, CSV, plots,
percentiles, peak-memory probes and the markdown fragment each script leaves for RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import math
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model.machine import describe as machine
from model.machine import proc_fields
from service.artifact import CONFIG_FILE, TOKENIZER_FILE, ArtifactConfig

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
QUICK_DIR = RESULTS_DIR / "quick"
DEFAULT_MODEL_DIR = Path("model/artifacts/spamassassin-linformer")
DEFAULT_DATA_DIR = Path("data/spamassassin")


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The flags every benchmark takes: --model-dir, --data, --quick, --out."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument(
        "--model-dir",
        type=Path,
        default=DEFAULT_MODEL_DIR,
        help=f"model artifact directory (default: {DEFAULT_MODEL_DIR})",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"dataset directory with test.jsonl (default: {DEFAULT_DATA_DIR})",
    )
    p.add_argument(
        "--quick", action="store_true", help="a few minutes' version, written under results/quick"
    )
    p.add_argument(
        "--out", type=Path, help="results directory (default: bench/results, or its quick/)"
    )
    return p


def add_service_flag(p: argparse.ArgumentParser) -> None:
    """--service-flag: extra linmod-serve flags for the benchmarks that start the service."""
    p.add_argument(
        "--service-flag",
        action="append",
        default=[],
        help="an extra linmod-serve flag, written with '=': --service-flag=--max-wait-ms=10",
    )


def out_dir(args: argparse.Namespace) -> Path:
    d = args.out or (QUICK_DIR if args.quick else RESULTS_DIR)
    d.mkdir(parents=True, exist_ok=True)
    return Path(d)


def command_line(module: str, argv: Sequence[str]) -> str:
    """The command that reproduces a run, as a user would type it."""
    return shlex.join(["python", "-m", module, *argv])


# ------------------------------------------------------------------------------- the machine


def machine_line(m: dict[str, Any]) -> str:
    return (
        f"{m['cpu']}, {m['logical_cpus']} logical CPUs ({m['cores_per_socket']} cores per "
        f"socket), {m['memory_gib']} GiB memory, int8 dot-product instructions: "
        f"{', '.join(m['int8_dot'])}"
    )


def versions(*modules: str) -> str:
    out = []
    for name in modules:
        try:
            mod = __import__(name)
            out.append(f"{name} {mod.__version__}")
        except ImportError:
            out.append(f"{name} absent")
    return ", ".join(out)


# --------------------------------------------------------------------------- peak memory


def memory_kib() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in KiB."""
    status = proc_fields("/proc/self/status")
    return int(status["VmRSS"].split()[0]), int(status["VmHWM"].split()[0])


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between ranks, as numpy's default."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], not {q}")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def check_target(measured: float, bound: float, at_least: bool = True) -> str:
    """'met' or 'missed by N%' for a measured ratio against the issue's bound."""
    if measured is None or math.isnan(measured):
        return "not measured"
    ok = measured >= bound if at_least else measured <= bound
    if ok:
        return "met"
    short = (bound - measured) / bound if at_least else (measured - bound) / bound
    return f"missed by {100 * short:.1f}%" if short < 0.01 else f"missed by {100 * short:.0f}%"


def f1_score(scores: Sequence[float], truth: Sequence[bool], threshold: float) -> float:
    """F1 of flagging by score >= threshold against the true flag."""
    tp = sum(1 for s, t in zip(scores, truth, strict=True) if s >= threshold and t)
    fp = sum(1 for s, t in zip(scores, truth, strict=True) if s >= threshold and not t)
    fn = sum(1 for s, t in zip(scores, truth, strict=True) if s < threshold and t)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


# ------------------------------------------------------------------------- tables and files


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value == 0 or abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(headers)
        w.writerows(rows)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_config(model_dir: Path) -> dict[str, Any]:
    """The artifact's config.json as a dict; exits with advice where there is none."""
    path = model_dir / CONFIG_FILE
    if not path.exists():
        raise SystemExit(
            f"{path} does not exist: pass --model-dir with a model artifact "
            "(python -m bench.random_artifact builds a random-weight one)"
        )
    return ArtifactConfig.from_dir(model_dir).model_dump()


def load_test_split(data: Path, count: int = 0, seed: int = 0) -> list[Any]:
    """Test-split examples: all of them (count 0), or a seeded sample kept in file order; exits
    with the reason where the split cannot be read."""
    import random

    from model.data import DataError, read_split

    try:
        examples = read_split(data, "test")
    except DataError as e:
        raise SystemExit(f"--data {data}: {e}") from None
    if 0 < count < len(examples):
        keep = sorted(random.Random(seed).sample(range(len(examples)), count))
        examples = [examples[i] for i in keep]
    return examples


def encode(model_dir: Path, texts: Sequence[str]) -> list[list[int]]:
    """Token ids as the service computes them: the artifact's tokenizer, no special tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
    tok.no_truncation()
    tok.no_padding()
    return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]


def write_fragment(
    out: Path,
    name: str,
    title: str,
    command: str,
    facts: dict[str, str],
    body: str,
    quick: bool,
    started: dict[str, Any],
) -> Path:
    """bench/results/<name>.md: the figures with their date, machine and command."""
    ended = machine()
    lines = [f"## {title}", ""]
    if quick:
        lines += ["*Quick mode: a check that the script works, not a measurement to cite.*", ""]
    lines += [
        f"- Date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- Machine: {machine_line(started)}",
        f"- Load average (1 min) at start / end: {started['load_1min']} / {ended['load_1min']}"
        f" on {started['logical_cpus']} CPUs",
        *(f"- {k}: {v}" for k, v in facts.items()),
        f"- Command: `{command}`",
        "",
        body.strip(),
        "",
    ]
    path = out / f"{name}.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
