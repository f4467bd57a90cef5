"""Analytic FLOPs, the paper's table, ONNX Runtime profile sums and /metrics deltas."""

from __future__ import annotations

import math

import pytest

from bench.attention import PAPER_MEMORY, PAPER_SPEEDUP, ratio_table, target_rows
from bench.attention_point import estimate_gib
from bench.loadgen import server_stats
from bench.ortprofile import op_totals
from bench.runners import flops_per_token


def test_flops_per_token_at_the_shipped_sizes() -> None:
    # Per layer: 8 d^2 (Q, K, V, out) + 4 d d_ff (MLP) + 8 k d (Linformer attention).
    d, d_ff, k, layers = 256, 1024, 128, 4
    per_layer = 8 * d * d + 4 * d * d_ff + 8 * k * d
    assert flops_per_token(d, layers, d_ff, k) == layers * per_layer == 7_340_032


def test_full_attention_grows_with_the_window_and_linformer_does_not() -> None:
    lin = [flops_per_token(256, 4, 1024, 128, "linformer", n) for n in (512, 4096)]
    full = [flops_per_token(256, 4, 1024, 128, "full", n) for n in (512, 4096)]
    assert lin[0] == lin[1]
    assert full[1] - full[0] == 4 * 4 * (4096 - 512) * 256
    # Full attention costs 4 n d per token; the Linformer 8 k d: equal at n = 2 k.
    assert flops_per_token(256, 4, 1024, 128, "full", 256) == lin[0]


def test_paper_table_is_complete_and_grows_with_n() -> None:
    ns = [512 * 2**i for i in range(8)]
    for table in (PAPER_SPEEDUP, PAPER_MEMORY):
        assert sorted(table) == ns
        k128 = [table[n][0] for n in ns]
        assert k128 == sorted(k128)
        assert all(table[n][0] >= table[n][1] for n in ns)  # a smaller k saves more


def test_memory_estimate_skips_materialised_attention_only() -> None:
    assert estimate_gib("full", "onnxruntime", 32768, 4) > 40
    assert estimate_gib("full-math", "pytorch", 32768, 4) > 40
    assert estimate_gib("full", "pytorch", 32768, 4) < 4  # the fused kernel
    assert estimate_gib("linformer-k128", "onnxruntime", 32768, 4) < 4


def test_op_totals_sums_kernel_times_by_operator() -> None:
    events = [
        {"cat": "Node", "name": "mm1_kernel_time", "dur": 100, "args": {"op_name": "MatMul"}},
        {"cat": "Node", "name": "mm2_kernel_time", "dur": 50, "args": {"op_name": "MatMul"}},
        {"cat": "Node", "name": "mm2_fence_before", "dur": 7, "args": {"op_name": "MatMul"}},
        {"cat": "Node", "name": "sm_kernel_time", "dur": 25, "args": {"op_name": "Softmax"}},
        {"cat": "Session", "name": "model_run", "dur": 999},
    ]
    assert op_totals(events) == {"MatMul": 150.0, "Softmax": 25.0}


def test_server_stats_from_two_scrapes() -> None:
    before = {
        "linmod_tokens_total": 100.0,
        "linmod_padded_tokens_total": 200.0,
        "linmod_batch_size_sum": 10.0,
        "linmod_batch_size_count": 5.0,
        "linmod_inference_duration_seconds_sum": 1.0,
        "linmod_queue_wait_seconds_sum{priority=interactive}": 0.5,
        "linmod_queue_wait_seconds_count{priority=interactive}": 10.0,
    }
    after = {
        "linmod_tokens_total": 1000.0,
        "linmod_padded_tokens_total": 1200.0,
        "linmod_batch_size_sum": 40.0,
        "linmod_batch_size_count": 15.0,
        "linmod_inference_duration_seconds_sum": 3.0,
        "linmod_queue_wait_seconds_sum{priority=interactive}": 1.5,
        "linmod_queue_wait_seconds_count{priority=interactive}": 30.0,
    }
    stats = server_stats(before, after)
    assert stats["real_over_padded"] == pytest.approx(0.9)
    assert stats["windows_per_run"] == pytest.approx(3.0)
    assert stats["engine_run_ms"] == pytest.approx(200.0)
    assert stats["queue_wait_ms"] == pytest.approx(50.0)
    assert all(math.isnan(v) for v in server_stats(after, after).values())


def test_ratio_table_and_targets_from_rows() -> None:
    rows = [
        {"variant": v, "runtime": rt, "n": 4096, "latency_ms": ms, "peak_mib": mib, "status": "ok"}
        for v, rt, ms, mib in [
            ("full", "pytorch", 300.0, 60.0),
            ("linformer-k128", "pytorch", 100.0, 30.0),
            ("full", "onnxruntime", 200.0, 400.0),
            ("linformer-k128", "onnxruntime", 100.0, 40.0),
        ]
    ]
    (row,) = ratio_table(rows, [4096], "latency_ms")
    assert row[0] == 4096 and row[1] == 3.0 and row[5] == 2.0
    assert math.isnan(row[2])  # k=256 was not measured
    assert row[-2:] == [*PAPER_SPEEDUP[4096]]
    (mem,) = ratio_table(rows, [4096], "peak_mib")
    assert mem[1] == 2.0 and mem[5] == 10.0
    speed_4096 = target_rows(rows)[0]
    assert speed_4096[1:] == ["3.00 / 2.00", "met / missed by 20%"]
