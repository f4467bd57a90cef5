"""Offline engines: ONNX Runtime and PyTorch runners over right-padded batches, the length-sorted
batches the service forms by default, throughput passes, and the model's FLOPs per token.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from service.artifact import INPUT_NAMES, MODEL_FILES, OUTPUT_NAME, pad_batch

MAX_TOKENS, MAX_BATCH = 16384, 32  # the service's default batch limits
Runner = Callable[[np.ndarray, np.ndarray], np.ndarray]


def flops_per_token(
    d_model: int, n_layers: int, d_ff: int, k: int, attention: str = "linformer", n: int = 0
) -> float:
    """Multiply-add FLOPs (2 per MAC) of the matrix products, per token of a window of n.

    Per layer: Q, K, V and output projections 8 d^2; MLP 4 d d_ff; Linformer attention 8 k d
    (projecting K and V along the sequence 4 k d, scores 2 k d, weighted values 2 k d), where
    full attention costs 4 n d. Embeddings, norms, activations and the head are left out.
    """
    attn = 8 * k * d_model if attention == "linformer" else 4 * n * d_model
    return float(n_layers * (8 * d_model**2 + 4 * d_model * d_ff + attn))


def batches(seqs: Sequence[Sequence[int]]) -> list[list[int]]:
    from model.batching import length_batches

    return length_batches([len(s) for s in seqs], MAX_TOKENS, MAX_BATCH)


def run_all(
    run: Runner, seqs: Sequence[Sequence[int]], pad_id: int, plan: list[list[int]]
) -> tuple[np.ndarray, float, int]:
    """Logits in input order, seconds of engine time, padded tokens computed."""
    out: np.ndarray | None = None
    seconds, padded = 0.0, 0
    for idx in plan:
        ids, mask = pad_batch([seqs[i] for i in idx], pad_id)
        t0 = time.perf_counter()
        logits = run(ids, mask)
        seconds += time.perf_counter() - t0
        padded += ids.size
        if out is None:
            out = np.zeros((len(seqs), logits.shape[1]), dtype=np.float32)
        out[idx] = logits
    assert out is not None
    return out, seconds, padded


def ort_runner(model_dir: Path, precision: str, threads: int, cuda: bool = False) -> Runner | None:
    """A Runner over model[.int8|.fp16].onnx, or None where CUDA was asked but is not in use."""
    import onnxruntime as ort

    # Without CUDA libraries the provider logs an error and falls back; the caller reports that.
    ort.set_default_logger_severity(4 if cuda else 3)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else None
    sess = ort.InferenceSession(
        str(model_dir / MODEL_FILES[precision]), so, providers=providers or ["CPUExecutionProvider"]
    )
    ort.set_default_logger_severity(3)
    if cuda and sess.get_providers()[0] != "CUDAExecutionProvider":
        return None

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feeds = dict(zip(INPUT_NAMES, (ids, mask), strict=True))
        return np.asarray(sess.run([OUTPUT_NAME], feeds)[0])

    return run


def torch_runner(model_dir: Path, threads: int) -> Runner:
    import torch

    from model.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    model = load_checkpoint(model_dir)

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(ids), torch.from_numpy(mask)).float().numpy()

    return run


def offline_docs_per_s(
    run: Runner, seqs: Sequence[Sequence[int]], pad_id: int, passes: int = 1, batched: bool = True
) -> tuple[float, np.ndarray, int, float]:
    """Median documents/s over `passes` timed passes after a warm-up over a tenth of the docs.

    Returns (docs/s, logits, padded tokens per pass, engine seconds per pass).
    """
    plan = batches(seqs) if batched else [[i] for i in range(len(seqs))]
    run_all(run, seqs, pad_id, plan[:: max(1, len(plan) // 10)])
    rates, logits, padded, secs = [], np.zeros(0), 0, []
    for _ in range(passes):
        logits, seconds, padded = run_all(run, seqs, pad_id, plan)
        rates.append(len(seqs) / seconds)
        secs.append(seconds)
    return statistics.median(rates), logits, padded, statistics.median(secs)
