"""bench.costgrid on the shipped model: the grid the service's warm-up times, written as a table
with the policy it implies; on a CUDA host, the fp16 grid, where batching must win."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from bench import costgrid
from bench.common import DEFAULT_MODEL_DIR

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "model.int8.onnx").is_file(), reason="the shipped model is absent"
)


def read(out: Path) -> list[dict[str, str]]:
    with (out / "costgrid.csv").open() as f:
        return list(csv.DictReader(f))


def test_cpu_grid_and_policy(tmp_path: Path) -> None:
    argv = ["--quick", "--out", str(tmp_path), "--max-batch-size", "4", "--repeats", "1",
            "--max-batch-tokens", "2048"]  # fmt: skip
    assert costgrid.main(argv) == 0
    rows = read(tmp_path)
    shapes = {(int(r["length"]), int(r["batch"])) for r in rows}
    assert {(32, 1), (32, 4), (512, 4), (4096, 1)} <= shapes
    assert all(b * n <= 2048 for n, b in shapes if b > 1)
    for r in rows:
        assert float(r["ms_per_run"]) > 0
        assert float(r["ms_per_window"]) == pytest.approx(
            float(r["ms_per_run"]) / int(r["batch"]), rel=1e-6
        )
    text = (tmp_path / "costgrid.md").read_text()
    assert "Policy for `--batching auto`" in text and "CPUExecutionProvider" in text
    assert (tmp_path / "costgrid.png").stat().st_size > 1000


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_fp16_grid_chooses_batching(tmp_path: Path) -> None:
    argv = ["--out", str(tmp_path), "--device", "cuda", "--precision", "fp16"]
    assert costgrid.main(argv) == 0
    text = (tmp_path / "costgrid.md").read_text()
    assert "CUDAExecutionProvider" in text and "precision fp16" in text
    assert "Policy for `--batching auto`: **batch**" in text
