"""Batching by measurement: the cost model over a timed engine, the policy it picks, and the
batcher following it (one window per run, no waiting when nothing is on the way, several runs
at once)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from service_testing import ControlledEngine

from service.artifact import ArtifactConfig, FloatArray, IntArray
from service.batcher import BatcherConfig, BatchFailedError, DynamicBatcher
from service.costmodel import CostModel, grid_batches, grid_lengths
from service.metrics import Metrics

LONG = 60.0  # a max-wait that no test may sit out


def timed_run(seconds: Callable[[int, int], float]) -> Callable[[np.ndarray, np.ndarray], None]:
    """An engine run that takes `seconds(batch, length)` of wall time."""

    def run(ids: np.ndarray, mask: np.ndarray) -> None:
        time.sleep(seconds(*ids.shape))

    return run


def gpu_like(batch: int, length: int) -> float:
    return 0.002 + 1e-8 * batch * length  # a launch costs most; the rows are nearly free


def cpu_like(batch: int, length: int) -> float:
    # Batching only costs (padding, cache misses). By enough that a busy host's sleep overshoot,
    # a fixed cost per run that batches share, cannot make batches look cheaper.
    return 5e-5 * batch * length * (1.0 if batch == 1 else 1.4)


def calibrate(seconds: Callable[[int, int], float]) -> CostModel:
    return CostModel.calibrate(
        timed_run(seconds), 0, n_max=512, max_batch_tokens=2048, max_batch_size=8, repeats=2
    )


def test_grid_covers_the_limits() -> None:
    assert grid_lengths(4096) == [32, 128, 512, 2048, 4096]
    assert grid_lengths(64) == [32, 64]
    assert grid_batches(32) == [1, 2, 4, 8, 16, 32]
    assert grid_batches(12) == [1, 2, 4, 8, 12] and grid_batches(1) == [1]


def test_calibration_measures_the_grid_within_the_token_budget() -> None:
    model = calibrate(cpu_like)
    shapes = set(model.points)
    assert (1, 512) in shapes and (8, 128) in shapes and (4, 512) in shapes
    assert all(b * n <= 2048 for b, n in shapes if b > 1)
    for (b, n), seconds in model.points.items():  # sleep overshoots (more on a busy host)
        assert cpu_like(b, n) <= seconds < 3 * cpu_like(b, n) + 0.05
    # Between and beyond measured points the prediction follows the measured surface.
    assert model.cost(1, 256) == pytest.approx(cpu_like(1, 256), rel=0.5)
    assert model.cost(6, 128) == pytest.approx(cpu_like(6, 128), rel=0.5)
    assert model.cost(1, 4096) > model.cost(1, 512)


def test_a_gpu_like_engine_batches_and_a_cpu_like_one_does_not() -> None:
    gpu, cpu = calibrate(gpu_like), calibrate(cpu_like)
    assert min(gpu.gains().values()) > 2  # about 4: sleeps overshoot on a busy host
    assert max(cpu.gains().values()) < 1.15
    on, off = gpu.policy("auto"), cpu.policy("auto")
    assert on.batching and "batches run" in on.reason
    assert not off.batching and "one window per run" in off.reason
    assert gpu.best_size([100] * 8) == 8
    assert cpu.best_size([100] * 8) == 1
    # The operator's word overrides the measurement either way.
    assert not gpu.policy("off").batching and cpu.policy("on").batching


def test_real_runs_move_the_level_not_the_shape() -> None:
    model = CostModel(points={(1, 32): 0.001, (2, 32): 0.002, (1, 128): 0.004})
    gains = model.gains()
    for _ in range(300):
        model.observe(1, 32, 0.002)  # the host got twice as slow (a neighbour, a second run)
    assert model.scale == pytest.approx(2.0, rel=0.01)
    assert model.cost(1, 128) == pytest.approx(0.008, rel=0.01)
    assert model.gains() == gains and model.observed_runs == 300
    described = model.describe()
    assert described["scale"] == pytest.approx(2.0, rel=0.01)
    assert {"batch": 1, "length": 32, "ms": 1.0} in described["grid_ms"]


class SoloEngine(ControlledEngine):
    """Records whether each run was told it runs alone."""

    def __init__(self, config: ArtifactConfig, workers: int = 1) -> None:
        super().__init__(config)
        self.workers = workers
        self.solo: list[bool] = []
        self.threads: list[str] = []

    def run(self, input_ids: IntArray, attention_mask: IntArray, solo: bool = False) -> FloatArray:
        self.solo.append(solo)
        self.threads.append(threading.current_thread().name)
        logits: FloatArray = super().run(input_ids, attention_mask, solo)
        return logits


def window(length: int, marker: int) -> IntArray:
    ids = np.full(length, 5, dtype=np.int64)
    ids[0] = marker
    return ids


async def batcher_for(engine: ControlledEngine, batching: str, **kw: float) -> DynamicBatcher:
    config = BatcherConfig(batching=batching, **kw)  # type: ignore[arg-type]
    batcher = DynamicBatcher(engine, Metrics(CollectorRegistry()), config)
    await batcher.start()
    return batcher


async def test_policy_off_runs_every_window_alone(model_config: ArtifactConfig) -> None:
    engine = SoloEngine(model_config)
    batcher = await batcher_for(engine, "off", max_wait_s=LONG)
    try:
        engine.gate.clear()
        first = asyncio.create_task(batcher.submit([window(4, 1)]))
        assert await asyncio.to_thread(engine.entered.acquire, timeout=5)
        rest = [batcher.submit([window(n, 10 + n)]) for n in (3, 4, 5)]
        rest.append(batcher.submit([window(6, 20), window(6, 21)]))
        engine.gate.set()
        await asyncio.wait_for(asyncio.gather(first, *rest), timeout=5)
        assert [b for b, _ in engine.runs] == [1] * 6
        # The first ran alone on an idle engine; the next found others queued behind it.
        assert engine.solo[0] and not engine.solo[1]
    finally:
        engine.gate.set()
        await batcher.close(timeout=5)


async def test_a_lone_request_never_waits_for_max_wait(model_config: ArtifactConfig) -> None:
    engine = SoloEngine(model_config)
    batcher = await batcher_for(engine, "on", max_wait_s=LONG, max_batch_size=8)
    try:
        # Nothing being tokenized: the partial batch leaves at once.
        await asyncio.wait_for(batcher.submit([window(4, 1)]), timeout=5)
        # A request still being tokenized is worth waiting for: the batch holds until it lands.
        batcher.note_incoming(1)
        waiting = asyncio.create_task(batcher.submit([window(4, 2)]))
        await asyncio.sleep(0.05)
        assert not waiting.done() and len(engine.runs) == 1
        second = asyncio.create_task(batcher.submit([window(4, 3)]))
        batcher.note_incoming(-1)
        await asyncio.wait_for(asyncio.gather(waiting, second), timeout=5)
        assert engine.runs == [(1, 4), (2, 4)]
    finally:
        await batcher.close(timeout=5)


async def test_several_runs_at_once(model_config: ArtifactConfig) -> None:
    engine = SoloEngine(model_config, workers=2)
    batcher = await batcher_for(engine, "off", max_wait_s=LONG)
    try:
        engine.gate.clear()
        both = asyncio.gather(batcher.submit([window(4, 1)]), batcher.submit([window(5, 2)]))
        for _ in range(2):  # both runs are inside the engine while the gate is shut
            assert await asyncio.to_thread(engine.entered.acquire, timeout=5)
        engine.gate.set()
        await asyncio.wait_for(both, timeout=5)
        assert sorted(engine.runs) == [(1, 4), (1, 5)]
    finally:
        engine.gate.set()
        await batcher.close(timeout=5)


async def test_an_idle_server_runs_a_short_lone_window_on_the_event_loops_thread(
    model_config: ArtifactConfig,
) -> None:
    engine = SoloEngine(model_config, workers=2)
    batcher = await batcher_for(engine, "off", max_wait_s=LONG, inline_run_s=0.003)
    batcher.cost = CostModel(points={(1, 32): 0.001, (1, 64): 0.004})  # as if calibrated
    loop_thread = threading.current_thread().name
    try:
        # Idle, and predicted within the bound: run here, the answer ready when submit returns.
        short = await asyncio.wait_for(batcher.submit([window(8, 1)]), timeout=5)
        assert engine.threads == [loop_thread] and engine.solo == [True]
        assert short.logits.shape == (1, len(model_config.labels))
        # Predicted over the bound (4 ms at 64 tokens): an engine thread runs it.
        await asyncio.wait_for(batcher.submit([window(64, 2)]), timeout=5)
        assert engine.threads[1].startswith("linmod-engine-")
        # A run in flight: the loop stays free, and the short window goes to the other thread.
        engine.gate.clear()
        held = asyncio.create_task(batcher.submit([window(64, 3)]))
        assert await asyncio.to_thread(engine.entered.acquire, timeout=5)
        engine.entered.release()  # (the first two runs' releases are still counted)
        beside = asyncio.create_task(batcher.submit([window(8, 4)]))
        for _ in range(4):
            await asyncio.sleep(0)
        assert not beside.done()  # not run on this thread: it waits at the gate like the other
        engine.gate.set()
        await asyncio.wait_for(asyncio.gather(held, beside), timeout=5)
        assert all(t.startswith("linmod-engine-") for t in engine.threads[2:])
        # A request on its way to the queue: no run on the loop either.
        batcher.note_incoming(1)
        await asyncio.wait_for(batcher.submit([window(8, 5)]), timeout=5)
        batcher.note_incoming(-1)
        assert engine.threads[4].startswith("linmod-engine-")
    finally:
        engine.gate.set()
        await batcher.close(timeout=5)


async def test_a_failed_run_on_the_loop_fails_its_request_and_the_next_one_runs(
    model_config: ArtifactConfig,
) -> None:
    engine = SoloEngine(model_config)
    engine.fail_if = lambda ids: int(ids[0, 0]) == 66
    batcher = await batcher_for(engine, "off", max_wait_s=LONG)
    batcher.cost = CostModel(points={(1, 32): 0.001})
    try:
        with pytest.raises(BatchFailedError, match="boom"):
            await asyncio.wait_for(batcher.submit([window(8, 66)]), timeout=5)
        result = await asyncio.wait_for(batcher.submit([window(8, 1)]), timeout=5)
        assert result.logits.shape == (1, len(model_config.labels))
        assert engine.threads == [threading.current_thread().name] * 2
        assert batcher.idle()  # the failed run gave its engine slot back
    finally:
        await batcher.close(timeout=5)


async def test_calibrate_sets_policy_metrics_and_prediction(model_config: ArtifactConfig) -> None:
    engine = SoloEngine(model_config)
    batcher = DynamicBatcher(
        engine, Metrics(CollectorRegistry()), BatcherConfig(max_batch_size=4, max_batch_tokens=256)
    )
    policy = batcher.calibrate(budget_s=5)
    shapes = {(b, n) for b, n in engine.runs}
    assert {(1, 32), (4, 32), (1, 64)} <= shapes  # n_max of the fake artifact is 64
    assert all(b * n <= 256 for b, n in shapes)
    assert policy is batcher.policy and batcher.cost.points
