"""The offline ceilings bench.load measures servers against: the engine alone over the same
tokenized documents, in three schedules, with its docs/s and CPU time per document.

- length-sorted batches (the service's default limits: <= 32 documents, 16,384 padded tokens);
- one document per run (what the naive server runs, one request at a time);
- one document per run on every core at once (the service's CPU engine: one single-threaded run
  per core), shown beside the other two.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.runners import batches, ort_runner
from service.artifact import pad_batch


@dataclass(frozen=True)
class OfflineResult:
    name: str
    docs_per_s: float
    cpu_ms_per_doc: float


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(name: str, one_pass: Callable[[], None], docs: int, passes: int) -> OfflineResult:
    one_pass()  # warm: shapes, allocators
    rates, cpus = [], []
    for _ in range(passes):
        cpu0, t0 = _cpu_s(), time.perf_counter()
        one_pass()
        rates.append(docs / (time.perf_counter() - t0))
        cpus.append(1000 * (_cpu_s() - cpu0) / docs)
    return OfflineResult(name, statistics.median(rates), statistics.median(cpus))


def offline_schedules(
    model_dir: Path, precision: str, threads: int, seqs: Sequence[Sequence[int]], passes: int
) -> list[OfflineResult]:
    """The three schedules over `seqs` (token ids already cut to n_max)."""
    from service.engine import OnnxEngine
    from service.settings import Precision

    pad_id = 0
    run = ort_runner(model_dir, precision, threads)
    assert run is not None
    plan = batches(seqs)
    padded_batches = [pad_batch([seqs[i] for i in idx], pad_id) for idx in plan]
    singles = [pad_batch([s], pad_id) for s in seqs]

    def sorted_batches() -> None:
        for ids, mask in padded_batches:
            run(ids, mask)

    def one_per_run() -> None:
        for ids, mask in singles:
            run(ids, mask)

    prec: Precision = precision  # type: ignore[assignment]
    engine = OnnxEngine.load(model_dir, device="cpu", precision=prec)
    pool = ThreadPoolExecutor(engine.workers)

    def one_per_core() -> None:
        list(pool.map(lambda feed: engine.run(*feed), singles))

    try:
        return [
            _timed(f"length-sorted batches ({threads} threads)", sorted_batches, len(seqs), passes),
            _timed(f"one per run ({threads} threads)", one_per_run, len(seqs), passes),
            _timed(
                f"one per core ({engine.workers} runs at once, 1 thread each)",
                one_per_core,
                len(seqs),
                passes,
            ),
        ]
    finally:
        pool.shutdown()
        engine.close()
