"""The dynamic batcher against a fake engine: no HTTP, no model, no waiting on wall-clock time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from service_testing import ControlledEngine

from service.artifact import ArtifactConfig, IntArray
from service.batcher import (
    BatcherClosedError,
    BatcherConfig,
    BatchFailedError,
    DeadlineExceededError,
    DynamicBatcher,
    Priority,
    QueueFullError,
    SubmitResult,
)
from service.metrics import Metrics

LONG = 60.0  # a max-wait no test may ever sit out: reaching it fails the test by timeout
SHORT = 0.001  # while the engine is held, partial batches wait regardless of max-wait


def window(length: int, marker: int = 7) -> IntArray:
    """A window whose first id tells the tests which request it belongs to."""
    ids = np.arange(2, length + 2, dtype=np.int64) % 250 + 2
    ids[0] = marker
    return ids


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


async def settle() -> None:
    """Let every task that can make progress without the engine do so."""
    for _ in range(20):
        await asyncio.sleep(0)


MakeBatcher = Callable[..., DynamicBatcher]


@pytest.fixture
async def make(engine: ControlledEngine) -> AsyncIterator[MakeBatcher]:
    made: list[DynamicBatcher] = []

    def factory(**overrides: float) -> DynamicBatcher:
        config = BatcherConfig(**{"max_wait_s": SHORT, **overrides})  # type: ignore[arg-type]
        batcher = DynamicBatcher(engine, Metrics(CollectorRegistry()), config)
        made.append(batcher)
        return batcher

    yield factory
    engine.gate.set()
    for batcher in made:
        await batcher.close(timeout=5)


async def started(batcher: DynamicBatcher) -> DynamicBatcher:
    await batcher.start()
    return batcher


async def plug(batcher: DynamicBatcher, engine: ControlledEngine) -> asyncio.Task[SubmitResult]:
    """Occupy the engine with one run held at the gate, so the queue can be arranged."""
    engine.gate.clear()
    task = asyncio.create_task(batcher.submit([window(3, marker=1)]))
    assert await asyncio.to_thread(engine.entered.acquire, timeout=5)
    return task


def submit_all(batcher: DynamicBatcher, *requests: list[IntArray], **kw: object) -> asyncio.Future:
    return asyncio.gather(*(batcher.submit(r, **kw) for r in requests))  # type: ignore[arg-type]


def markers(engine: ControlledEngine) -> list[list[int]]:
    """The request markers in each engine run after the plug."""
    return [sorted(int(i) for i in ids[:, 0]) for ids in engine.seen if ids[0, 0] != 1]


async def test_full_batch_leaves_at_once(make: MakeBatcher, engine: ControlledEngine) -> None:
    batcher = await started(make(max_batch_size=4, max_wait_s=LONG))
    requests = [[window(10, marker=m)] for m in range(10, 14)]
    results = await asyncio.wait_for(submit_all(batcher, *requests), timeout=5)
    assert engine.runs == [(4, 10)]
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result.logits[0], engine.single(request[0]))


async def test_partial_batch_leaves_after_max_wait(
    make: MakeBatcher, engine: ControlledEngine
) -> None:
    batcher = await started(make(max_batch_size=8, max_wait_s=0.002))
    await asyncio.wait_for(submit_all(batcher, [window(5)], [window(6)], [window(7)]), timeout=5)
    assert engine.runs == [(3, 7)]


async def test_token_budget_holds_and_results_match(
    make: MakeBatcher, engine: ControlledEngine
) -> None:
    batcher = await started(make(max_batch_size=32, max_batch_tokens=100))
    rng = np.random.default_rng(0)
    requests = [[window(int(n), marker=i + 10)] for i, n in enumerate(rng.integers(1, 51, 40))]
    results = await asyncio.wait_for(submit_all(batcher, *requests), timeout=5)
    assert sum(b for b, _ in engine.runs) == 40
    assert all(b * t <= 100 for b, t in engine.runs)
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result.logits[0], engine.single(request[0]))


async def test_sorting_by_length_cuts_padding(make: MakeBatcher, engine: ControlledEngine) -> None:
    batcher = await started(make(max_batch_size=4))
    first = await plug(batcher, engine)
    lengths = [10, 50] * 4
    burst = submit_all(batcher, *([window(n)] for n in lengths))
    await settle()
    engine.gate.set()
    await asyncio.wait_for(asyncio.gather(first, burst), timeout=5)
    # Arrival order would have made two batches of (4, 50), half of them padding.
    assert engine.runs[1:] == [(4, 10), (4, 50)]
    assert value(batcher._metrics, "linmod_batch_padding_ratio_bucket", le="0.0") == 3


async def test_interactive_goes_first_and_jobs_never_lengthen_its_run(
    make: MakeBatcher, engine: ControlledEngine
) -> None:
    batcher = await started(make(max_batch_size=4))
    first = await plug(batcher, engine)
    jobs = submit_all(
        batcher, *([window(8, marker=m)] for m in (20, 21, 22)), priority=Priority.BATCH
    )
    await settle()
    users = submit_all(batcher, *([window(8, marker=m)] for m in (30, 31, 32)))
    await settle()
    engine.gate.set()
    await asyncio.wait_for(asyncio.gather(first, jobs, users), timeout=5)
    # The jobs came first, but no job batch was formed while the engine was busy, and the
    # interactive batch has room left yet carries no job window.
    assert markers(engine) == [[30, 31, 32], [20, 21, 22]]


async def test_a_window_joins_only_while_the_batch_stays_full_enough(
    make: MakeBatcher, engine: ControlledEngine
) -> None:
    batcher = await started(make(max_batch_size=8, min_batch_fill=0.85))
    first = await plug(batcher, engine)
    burst = submit_all(
        batcher,
        [window(60, marker=40)],
        [window(57, marker=41)],
        [window(8, marker=42)],
        [window(6, marker=43)],
    )
    await settle()
    engine.gate.set()
    await asyncio.wait_for(asyncio.gather(first, burst), timeout=5)
    # 60 with 8 would be 68 real tokens in 120 padded: the short ones make their own run.
    assert markers(engine) == [[40, 41], [42, 43]]
    padded = value(batcher._metrics, "linmod_padded_tokens_total")
    real = value(batcher._metrics, "linmod_tokens_total")
    assert real / padded >= 0.85


async def test_job_batches_keep_to_their_own_token_budget(
    make: MakeBatcher, engine: ControlledEngine
) -> None:
    batcher = await started(
        make(max_batch_size=16, max_batch_tokens=1000, max_job_batch_tokens=100)
    )
    first = await plug(batcher, engine)
    jobs = submit_all(
        batcher, *([window(30, marker=m)] for m in range(50, 56)), priority=Priority.BATCH
    )
    await settle()
    engine.gate.set()
    await asyncio.wait_for(asyncio.gather(first, jobs), timeout=5)
    assert [len(m) for m in markers(engine)] == [3, 3]  # 3 x 30 <= 100 < 4 x 30


async def test_batch_jobs_have_their_own_bound(make: MakeBatcher, engine: ControlledEngine) -> None:
    batcher = await started(make(max_batch_size=4, max_job_items=2))
    first = await plug(batcher, engine)
    held = asyncio.create_task(batcher.submit([window(4), window(5)], priority=Priority.BATCH))
    await settle()
    with pytest.raises(QueueFullError):
        await batcher.submit([window(4)], priority=Priority.BATCH)
    waiting = asyncio.create_task(
        batcher.submit([window(4)], priority=Priority.BATCH, wait_for_room=True)
    )
    # Interactive traffic is not bound by the jobs' limit.
    user = asyncio.create_task(batcher.submit([window(4)]))
    engine.gate.set()
    await asyncio.wait_for(asyncio.gather(first, held, waiting, user), timeout=5)


async def test_a_caller_that_has_gone_is_skipped(
    make: MakeBatcher, engine: ControlledEngine
) -> None:
    batcher = await started(make(max_batch_size=1))
    first = await plug(batcher, engine)
    gone = asyncio.create_task(batcher.submit([window(9, marker=40), window(9, marker=41)]))
    stays = asyncio.create_task(batcher.submit([window(9, marker=50)]))
    await settle()
    gone.cancel()
    engine.gate.set()
    await asyncio.wait_for(asyncio.gather(first, stays), timeout=5)
    with pytest.raises(asyncio.CancelledError):
        await gone
    # The first window of the gone request may already have been formed into a batch behind
    # the plug; it is dropped before the engine sees it.
    assert markers(engine) == [[50]]
    assert value(batcher._metrics, "linmod_rejections_total", reason="cancelled") == 1
    assert batcher.queued(Priority.INTERACTIVE) == (0, 0)


async def test_engine_failure_fails_only_that_batch(
    make: MakeBatcher, engine: ControlledEngine
) -> None:
    engine.fail_if = lambda ids: bool((ids[:, 0] == 66).any())
    batcher = await started(make(max_batch_size=2))
    first = await plug(batcher, engine)
    results = asyncio.gather(
        *(
            batcher.submit(r)
            for r in ([window(8, marker=66)], [window(8, marker=67)], [window(40, marker=68)])
        ),
        return_exceptions=True,
    )
    await settle()
    engine.gate.set()
    await first
    bad, neighbour, other = await asyncio.wait_for(results, timeout=5)
    assert isinstance(bad, BatchFailedError) and "boom" in str(bad)
    assert isinstance(neighbour, BatchFailedError)
    assert isinstance(other, SubmitResult)
    # The batcher goes on serving.
    await asyncio.wait_for(batcher.submit([window(8, marker=69)]), timeout=5)
    assert value(batcher._metrics, "linmod_rejections_total", reason="engine_error") == 2


async def test_full_queue_refuses_whole_requests(
    make: MakeBatcher, engine: ControlledEngine
) -> None:
    batcher = await started(make(max_batch_size=1, max_queue_items=2))
    first = await plug(batcher, engine)
    # One request is formed into the batch waiting behind the plug, two fill the queue.
    admitted = [asyncio.create_task(batcher.submit([window(5)]))]
    await settle()
    admitted += [asyncio.create_task(batcher.submit([window(5)])) for _ in range(2)]
    await settle()
    assert batcher.queued(Priority.INTERACTIVE) == (2, 10)
    for request in ([window(5)], [window(5), window(6)]):
        with pytest.raises(QueueFullError) as refused:
            await batcher.submit(request)
        assert refused.value.retry_after >= 1
    assert batcher.queued(Priority.INTERACTIVE) == (2, 10)
    assert value(batcher._metrics, "linmod_queue_items", priority="interactive") == 2
    assert value(batcher._metrics, "linmod_rejections_total", reason="queue_full") == 2
    engine.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *admitted), timeout=5)


async def test_deadline_drops_the_request(make: MakeBatcher, engine: ControlledEngine) -> None:
    batcher = await started(make(max_batch_size=1))
    first = await plug(batcher, engine)
    loop = asyncio.get_running_loop()
    with pytest.raises(DeadlineExceededError):
        await batcher.submit([window(5, marker=70)], deadline=loop.time() + 0.005)
    engine.gate.set()
    await first
    assert markers(engine) == []
    assert value(batcher._metrics, "linmod_rejections_total", reason="deadline") == 1


async def test_shutdown_drains_the_queue(make: MakeBatcher, engine: ControlledEngine) -> None:
    batcher = await started(make(max_batch_size=2))
    first = await plug(batcher, engine)
    queued = [asyncio.create_task(batcher.submit([window(n)])) for n in (4, 5, 6, 7, 8)]
    await settle()
    closing = asyncio.create_task(batcher.close(timeout=5))
    await settle()
    with pytest.raises(BatcherClosedError):
        await batcher.submit([window(4)])
    engine.gate.set()
    results = await asyncio.wait_for(asyncio.gather(first, *queued), timeout=5)
    assert all(r.logits.shape == (1, 2) for r in results)
    await closing


async def test_shutdown_timeout_fails_what_is_left(
    make: MakeBatcher, engine: ControlledEngine
) -> None:
    batcher = await started(make(max_batch_size=1))
    first = await plug(batcher, engine)
    queued = asyncio.create_task(batcher.submit([window(4)]))
    await settle()
    await batcher.close(timeout=0.001)
    for task in (first, queued):
        with pytest.raises(BatcherClosedError):
            await task


async def test_multi_window_request_and_timings(
    make: MakeBatcher, engine: ControlledEngine
) -> None:
    batcher = await started(make(max_batch_size=2, min_batch_fill=0.0))
    windows = [window(n, marker=80 + n) for n in (30, 12, 64, 5, 17)]
    result = await asyncio.wait_for(batcher.submit(windows), timeout=5)
    assert result.logits.shape == (5, 2)
    for row, w in enumerate(windows):
        np.testing.assert_array_equal(result.logits[row], engine.single(w))
    assert result.batches == 3 and result.inference_s > 0
    assert value(batcher._metrics, "linmod_batch_size_count") == 3
    assert value(batcher._metrics, "linmod_tokens_total") == 128


async def test_windows_must_fit_the_model(make: MakeBatcher) -> None:
    batcher = await started(make())
    with pytest.raises(ValueError, match="1 to 64 tokens"):
        await batcher.submit([window(65)])
    empty = await batcher.submit([])
    assert empty.logits.shape == (0, 2)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    max_batch_size=st.integers(1, 8),
    max_batch_tokens=st.integers(64, 300),
    requests=st.lists(
        st.lists(st.integers(1, 64), min_size=1, max_size=4), min_size=1, max_size=12
    ),
    priorities=st.lists(st.sampled_from(Priority), min_size=12, max_size=12),
)
async def test_any_mix_respects_the_limits_and_returns_each_windows_logits(
    model_config: ArtifactConfig,
    max_batch_size: int,
    max_batch_tokens: int,
    requests: list[list[int]],
    priorities: list[Priority],
) -> None:
    engine = ControlledEngine(model_config)
    config = BatcherConfig(max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                           max_wait_s=SHORT)  # fmt: skip
    batcher = DynamicBatcher(engine, Metrics(CollectorRegistry()), config)
    await batcher.start()
    windows = [[window(n, marker=10 + i) for n in lengths] for i, lengths in enumerate(requests)]
    results = await asyncio.wait_for(
        asyncio.gather(
            *(batcher.submit(w, priority=p) for w, p in zip(windows, priorities, strict=False))
        ),
        timeout=5,
    )
    await batcher.close()
    assert sum(b for b, _ in engine.runs) == sum(len(r) for r in requests)
    assert all(b <= max_batch_size and b * t <= max_batch_tokens for b, t in engine.runs)
    for request, result in zip(windows, results, strict=True):
        for row, w in enumerate(request):
            np.testing.assert_array_equal(result.logits[row], engine.single(w))


async def test_with_batching_off_a_lone_window_keeps_its_runner_until_the_engine_returns(
    make: MakeBatcher, engine: ControlledEngine
) -> None:
    # One window, nothing queued, a runner free: the caller starts the run itself. Its caller
    # going away must not free the runner while the engine thread is still busy.
    batcher = await started(make(batching="off", max_wait_s=LONG))
    engine.gate.clear()
    gone = asyncio.create_task(batcher.submit([window(5, marker=80)]))
    assert await asyncio.to_thread(engine.entered.acquire, timeout=5)
    gone.cancel()
    waiting = asyncio.create_task(batcher.submit([window(6, marker=81)]))
    await settle()
    assert not await asyncio.to_thread(engine.entered.acquire, timeout=0.05)
    # The next window is handed over ahead, to wait for the one engine thread, not run beside.
    assert batcher.queued(Priority.INTERACTIVE) == (0, 0) and batcher._ready.qsize() == 1
    engine.gate.set()
    result = await asyncio.wait_for(waiting, timeout=5)
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert markers(engine) == [[80], [81]]
    assert result.logits.shape == (1, 2) and result.batches == 1
    assert value(batcher._metrics, "linmod_batch_size_count") == 2


async def test_an_engine_thread_starts_the_next_window_without_the_event_loop(
    make: MakeBatcher, engine: ControlledEngine
) -> None:
    # One window per run: the next window waits with the engine thread, so a busy event loop
    # (here: blocked outright) cannot leave the engine idle between runs.
    batcher = await started(make(batching="off", max_wait_s=LONG))
    engine.gate.clear()
    first = asyncio.create_task(batcher.submit([window(5, marker=90)]))
    assert await asyncio.to_thread(engine.entered.acquire, timeout=5)
    second = asyncio.create_task(batcher.submit([window(6, marker=91)]))
    await settle()
    engine.gate.set()
    assert engine.entered.acquire(timeout=5)  # on the loop's own thread: the loop does nothing
    results = await asyncio.wait_for(asyncio.gather(first, second), timeout=5)
    assert markers(engine) == [[90], [91]]
    assert [r.batches for r in results] == [1, 1]
    await batcher.close()


async def test_shutdown_waits_for_a_run_started_at_once(
    make: MakeBatcher, engine: ControlledEngine
) -> None:
    batcher = await started(make(batching="off"))
    engine.gate.clear()
    running = asyncio.create_task(batcher.submit([window(6, marker=82)]))
    assert await asyncio.to_thread(engine.entered.acquire, timeout=5)
    closing = asyncio.create_task(batcher.close(timeout=5))
    await settle()
    assert not closing.done() and not running.done()
    engine.gate.set()
    result = await asyncio.wait_for(running, timeout=5)
    assert result.logits.shape == (1, 2)
    await asyncio.wait_for(closing, timeout=5)


async def test_a_window_that_will_run_long_starts_ahead_of_those_just_before_it(
    make: MakeBatcher, engine: ControlledEngine
) -> None:
    # The queue's order: arrival, less the window's predicted run time (here 4 ms a token).
    batcher = await started(make(batching="off", max_wait_s=LONG))
    batcher.cost.cost = lambda batch, length: batch * length * 0.004  # type: ignore[method-assign]
    running = await plug(batcher, engine)
    ahead = asyncio.create_task(batcher.submit([window(3, marker=2)]))  # handed to the thread
    await settle()
    short = asyncio.create_task(batcher.submit([window(3, marker=10)]))
    await settle()
    long = asyncio.create_task(batcher.submit([window(50, marker=11)]))  # 0.2 s ahead
    await settle()
    await asyncio.sleep(0.1)  # later than a 5-token window's 0.02 s ahead
    medium = asyncio.create_task(batcher.submit([window(5, marker=12)]))
    await settle()
    engine.gate.set()
    await asyncio.wait_for(asyncio.gather(running, ahead, short, long, medium), timeout=5)
    assert markers(engine) == [[2], [11], [10], [12]]
