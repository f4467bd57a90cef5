"""This machine's matrix-multiply peak: fp32 with torch, numpy and ONNX Runtime, int8 (u8 x s8 ->
s32) with ONNX Runtime's MatMulInteger, the kernels the exported models run on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np


def best_rate(fn: Callable[[], Any], flops: float, seconds: float) -> float:
    """Best GFLOP/s of `fn` over repeated calls for about `seconds` (after one warm-up call)."""
    fn()
    best, spent = 0.0, 0.0
    while spent < seconds:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        spent += dt
        best = max(best, flops / dt / 1e9)
    return best


def _ort_matmul(size: int, int8: bool, threads: int) -> Callable[[], Any]:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if int8:
        a = rng.integers(0, 255, (size, size), dtype=np.uint8)
        b = rng.integers(-127, 127, (size, size), dtype=np.int8)
        node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
        a_type, y_type = TensorProto.UINT8, TensorProto.INT32
    else:
        a = rng.standard_normal((size, size), dtype=np.float32)
        b = rng.standard_normal((size, size), dtype=np.float32)
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
        a_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    graph = helper.make_graph(
        [node],
        "gemm",
        [helper.make_tensor_value_info("A", a_type, [size, size])],
        [helper.make_tensor_value_info("Y", y_type, [size, size])],
        initializer=[numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(
        model.SerializeToString(),
        so,
        providers=["CPUExecutionProvider"],
    )
    return lambda: sess.run(None, {"A": a})


def gemm_peaks(threads: int, quick: bool = False) -> dict[str, float]:
    """GFLOP/s (GOP/s for int8) of square products, best of repeated runs."""
    import torch

    size = 1024 if quick else 2048
    seconds = 1.0 if quick else 3.0
    flops = 2.0 * size**3
    torch.set_num_threads(threads)
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    na, nb = a.numpy(), b.numpy()
    return {
        "fp32 torch.mm": best_rate(lambda: torch.mm(a, b), flops, seconds),
        "fp32 numpy": best_rate(lambda: na @ nb, flops, seconds),
        "fp32 ORT MatMul": best_rate(_ort_matmul(size, False, threads), flops, seconds),
        "int8 ORT MatMulInteger": best_rate(_ort_matmul(size, True, threads), flops, seconds),
    }


def split_peaks(peaks: dict[str, float]) -> tuple[float, float]:
    """(best fp32, best int8) of the measured kernels."""
    fp32 = max((v for k, v in peaks.items() if k.startswith("fp32")), default=float("nan"))
    int8 = max((v for k, v in peaks.items() if k.startswith("int8")), default=float("nan"))
    return fp32, int8
