"""Where ONNX Runtime spends an engine's time: its built-in profiler, summed by operator type."""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.artifact import INPUT_NAMES, OUTPUT_NAME


def op_totals(events: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Microseconds per operator type from ONNX Runtime profile events (kernel times only)."""
    totals: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time"):
            totals[event.get("args", {}).get("op_name", "?")] += float(event.get("dur", 0))
    return dict(totals)


def profile_ops(
    model: Path, batches: Sequence[tuple[np.ndarray, np.ndarray]], threads: int, top: int = 8
) -> list[list[Any]]:
    """[op type, ms, share of kernel time] of the `top` operator types over these batches."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "ort")
        sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        for ids, mask in batches:
            sess.run([OUTPUT_NAME], dict(zip(INPUT_NAMES, (ids, mask), strict=True)))
        events = json.loads(Path(sess.end_profiling()).read_text())
    totals = op_totals(events)
    whole = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return [[op, us / 1000, 100 * us / whole] for op, us in ranked]
