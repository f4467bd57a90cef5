"""One point of the attention benchmark, measured alone in this process: the latency of a batch-1
forward pass and its peak memory (the rise of VmHWM over the resident size just before it, once
the model and a small warm-up run are in place).

    python -m bench.attention_point '{"variant": "full", "runtime": "pytorch", "n": 4096, ...}'
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.common import memory_kib, reset_peak

# Variant -> model config overrides. "full-math" forces SDPA's unfused kernel, which holds the
# n x n score matrix as the paper's 2020 baseline did; "full" lets PyTorch pick (a fused kernel).
VARIANTS: dict[str, dict[str, Any]] = {
    "linformer-k128": {"attention": "linformer", "k": 128},
    "linformer-k256": {"attention": "linformer", "k": 256},
    "full": {"attention": "full"},
    "full-math": {"attention": "full"},
}
ORT_VARIANTS = ["linformer-k128", "linformer-k256", "full"]


def estimate_gib(variant: str, runtime: str, n: int, n_heads: int) -> float:
    """A generous peak estimate, to skip points that would not fit in memory."""
    activations = n * 64 * 1024  # a few (n, d_ff) fp32 tensors
    materialised = variant == "full-math" or (variant == "full" and runtime == "onnxruntime")
    scores = 3 * n_heads * n * n * 4 if materialised else 0  # scores, masked, softmax
    return (activations + scores) / 2**30


def timed(run: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """Peak KiB of the first run over the resident size before it, and every run's seconds."""
    rss, _ = memory_kib()
    exact = reset_peak()
    times = []
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
    _, hwm = memory_kib()
    peak = hwm - rss if exact else float("nan")
    # Slow points get fewer repeats: the spread at seconds per run is small anyway.
    for _ in range(repeats if times[0] < 20 else 1):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return peak, times


def run_point(p: dict[str, Any]) -> dict[str, Any]:
    """Measure one (variant, runtime, n); the ONNX file comes from the parent's export."""
    import numpy as np

    n, threads = p["n"], p["threads"]
    ids = np.random.default_rng(0).integers(2, p["sizes"]["vocab_size"], size=(1, n))
    mask = np.ones_like(ids)
    if p["runtime"] == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(p["onnx"], so, providers=["CPUExecutionProvider"])
        sess.run(None, {"input_ids": ids[:, :16], "attention_mask": mask[:, :16]})
        peak, times = timed(
            lambda: sess.run(None, {"input_ids": ids, "attention_mask": mask}), p["repeats"]
        )
    else:
        import contextlib

        import torch

        from model.config import ModelConfig
        from model.linformer import LinformerClassifier

        torch.set_num_threads(threads)
        cfg = ModelConfig(**p["sizes"], **VARIANTS[p["variant"]], n_max=n, dropout=0.0)
        model = LinformerClassifier(cfg).eval()
        t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
        kernel: Any = contextlib.nullcontext()
        if p["variant"] == "full-math":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            kernel = sdpa_kernel(SDPBackend.MATH)
        with torch.inference_mode(), kernel:
            model(t_ids[:, :16], t_mask[:, :16])
            peak, times = timed(lambda: model(t_ids, t_mask), p["repeats"])
    warm = times[1:] or times
    return {
        "latency_ms": 1000 * statistics.median(warm),
        "peak_mib": peak / 1024,
        "runs": len(times),
    }


if __name__ == "__main__":
    print(json.dumps(run_point(json.loads(sys.argv[1]))))
