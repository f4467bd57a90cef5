"""Shared benchmark helpers: percentiles, F1, target checks, tables, arguments."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from bench.common import (
    QUICK_DIR,
    RESULTS_DIR,
    base_parser,
    check_target,
    command_line,
    f1_score,
    markdown_table,
    out_dir,
    percentile,
)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
@pytest.mark.parametrize("q", [0, 1, 50, 95, 99, 100])
def test_percentile_matches_numpy(n: int, q: float) -> None:
    values = list(np.random.default_rng(n).exponential(size=n))
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges() -> None:
    assert math.isnan(percentile([], 50))
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # order of the input does not matter
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_f1_score() -> None:
    scores = [0.9, 0.8, 0.2, 0.6, 0.1]
    truth = [True, False, True, True, False]
    # flagged at 0.5: 0.9 (tp), 0.8 (fp), 0.6 (tp); missed 0.2 (fn): F1 = 4 / (4 + 1 + 1)
    assert f1_score(scores, truth, 0.5) == pytest.approx(4 / 6)
    assert f1_score([0.1], [True], 0.5) == 0.0


def test_check_target() -> None:
    assert check_target(3.1, 3.0) == "met"
    assert check_target(2.4, 3.0) == "missed by 20%"
    assert check_target(0.3, 0.5, at_least=False) == "met"
    assert check_target(0.75, 0.5, at_least=False) == "missed by 50%"
    assert check_target(float("nan"), 1.0) == "not measured"


def test_markdown_table_formats_numbers() -> None:
    text = markdown_table(["a", "b"], [["x", 1234.5], ["y", float("nan")], ["z", 0.01234]])
    lines = text.splitlines()
    assert lines[0] == "| a | b |" and lines[1] == "|---|---|"
    assert lines[2:] == ["| x | 1,234 |", "| y | – |", "| z | 0.0123 |"]


def test_quick_mode_arguments(tmp_path: Path) -> None:
    p = base_parser("bench", "")
    args = p.parse_args(["--quick"])
    assert args.quick and args.model_dir == Path("model/artifacts/spamassassin-linformer")
    assert args.out is None
    # Quick runs write under results/quick, never beside the committed report's figures.
    assert QUICK_DIR == RESULTS_DIR / "quick"
    args = p.parse_args(["--quick", "--out", str(tmp_path / "r"), "--model-dir", "m"])
    assert out_dir(args) == tmp_path / "r" and (tmp_path / "r").is_dir()
    assert args.model_dir == Path("m")


def test_command_line_quotes() -> None:
    assert command_line("bench.load", ["--model-dir", "a b"]) == (
        "python -m bench.load --model-dir 'a b'"
    )


def test_a_missing_test_split_exits_with_the_reason(tmp_path: Path) -> None:
    from bench.common import load_test_split

    with pytest.raises(SystemExit) as stop:
        load_test_split(tmp_path / "nowhere")
    assert isinstance(stop.value.code, str)
    assert "test.jsonl does not exist" in stop.value.code and "linmod-data" in stop.value.code
