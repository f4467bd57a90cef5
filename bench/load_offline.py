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


def _timed(
    name: str, one_pass: Callable[[], None], docs: int, passes: int, warm: bool = True
) -> OfflineResult:
    if warm:
        one_pass()  # shapes, allocators
    rates, cpus = [], []
    for _ in range(passes):
        cpu0, t0 = _cpu_s(), time.perf_counter()
        one_pass()
        rates.append(docs / (time.perf_counter() - t0))
        cpus.append(1000 * (_cpu_s() - cpu0) / docs)
    return OfflineResult(name, statistics.median(rates), statistics.median(cpus))


class OfflineReference:
    """The three schedules over `seqs` (token ids already cut to n_max), loaded once so that a
    benchmark can measure them again between its server turns: on a shared host the machine's
    speed drifts, and a ceiling measured once at the start is a ceiling for another machine."""

    def __init__(
        self, model_dir: Path, precision: str, threads: int, seqs: Sequence[Sequence[int]]
    ) -> None:
        from service.engine import OnnxEngine
        from service.settings import Precision

        pad_id = 0
        run = ort_runner(model_dir, precision, threads)
        assert run is not None
        padded_batches = [pad_batch([seqs[i] for i in idx], pad_id) for idx in batches(seqs)]
        singles = [pad_batch([s], pad_id) for s in seqs]
        prec: Precision = precision  # type: ignore[assignment]
        self._engine = OnnxEngine.load(model_dir, device="cpu", precision=prec)
        self._pool = ThreadPoolExecutor(self._engine.workers)
        engine, pool = self._engine, self._pool

        def sorted_batches() -> None:
            for ids, mask in padded_batches:
                run(ids, mask)

        def one_per_run() -> None:
            for ids, mask in singles:
                run(ids, mask)

        def one_per_core() -> None:
            list(pool.map(lambda feed: engine.run(*feed), singles))

        self.docs = len(seqs)
        self.schedules: list[tuple[str, Callable[[], None]]] = [
            (f"length-sorted batches ({threads} threads)", sorted_batches),
            (f"one per run ({threads} threads)", one_per_run),
            (f"one per core ({engine.workers} runs at once, 1 thread each)", one_per_core),
        ]
        self._warm = False

    def measure(self, passes: int = 1) -> list[OfflineResult]:
        """Each schedule's median over `passes` passes (the first call warms each first)."""
        results = []
        for name, one_pass in self.schedules:
            results.append(_timed(name, one_pass, self.docs, passes, warm=not self._warm))
        self._warm = True
        return results

    def close(self) -> None:
        self._pool.shutdown()
        self._engine.close()


def median_results(measures: Sequence[Sequence[OfflineResult]]) -> list[OfflineResult]:
    """Per schedule, the median docs/s and CPU per document over several measures."""
    return [
        OfflineResult(
            group[0].name,
            statistics.median(o.docs_per_s for o in group),
            statistics.median(o.cpu_ms_per_doc for o in group),
        )
        for group in zip(*measures, strict=True)
    ]
