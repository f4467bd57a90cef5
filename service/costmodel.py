"""What an engine run costs, measured on the session in use, and the batching policy it implies.

At warm-up the engine is timed over a grid of batch shapes (windows x padded length). From that
grid the policy follows: where running b windows together costs less per window than running
them one by one, batching pays (a GPU: a run of 32 costs little more than a run of 1); where it
does not (a small model on a CPU, whose cores a single window already keeps busy), every window
runs alone, at once. Real runs keep the level of the model current (`scale`): the grid gives the
shape of the cost surface, the traffic the load of the machine it runs on.

    model = CostModel.calibrate(engine.run, pad_id, n_max=4096, max_batch_tokens=16384,
                                max_batch_size=32)
    policy = model.policy("auto")        # BatchingPolicy(batching=False, reason=...)
    seconds = model.cost(8, 512)
"""

from __future__ import annotations

import bisect
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

BatchingMode = Literal["auto", "on", "off"]
Run = Callable[[np.ndarray, np.ndarray], Any]

# Batching is chosen only when it is clearly cheaper: a 15% gain at the typical length.
MIN_GAIN = 1.15


@dataclass(frozen=True)
class BatchingPolicy:
    """Whether windows share engine runs, and why."""

    mode: BatchingMode
    batching: bool
    reason: str


@dataclass
class CostModel:
    """Seconds per engine run at measured (batch, length) points; interpolated in log space."""

    points: dict[tuple[int, int], float] = field(default_factory=dict)
    scale: float = 1.0  # observed / predicted over recent real runs
    calibration_s: float = 0.0
    observed_runs: int = 0
    _cache: tuple[int, dict[int, tuple[list[float], list[float]]]] | None = field(
        default=None, repr=False, compare=False
    )

    @classmethod
    def calibrate(
        cls,
        run: Run,
        pad_id: int,
        *,
        n_max: int,
        max_batch_tokens: int,
        max_batch_size: int,
        repeats: int = 2,
        budget_s: float = 30.0,
        max_run_s: float = 1.0,
        repeat_below_s: float = 0.1,
    ) -> CostModel:
        """Time the engine over the grid: the median of `repeats` runs after a first one, or
        one run after it where the first took over `repeat_below_s`. A row stops at a run slower than
        `max_run_s`, the whole grid at `budget_s`, so a large model on a slow host still
        starts."""
        model = cls()
        token = 1 if pad_id != 1 else 2
        start = time.perf_counter()
        for length in grid_lengths(n_max):
            for batch in grid_batches(max_batch_size):
                if batch > 1 and batch * length > max_batch_tokens:
                    break
                ids = np.full((batch, length), token, dtype=np.int64)
                mask = np.ones((batch, length), dtype=np.int64)
                t0 = time.perf_counter()
                run(ids, mask)  # the first run of a shape pays for allocations
                first = time.perf_counter() - t0
                times = []
                # The first run of a shape is cold: at least one more is timed, unless the
                # first was too slow to repeat at all.
                timed = repeats if first < repeat_below_s else (1 if first < max_run_s else 0)
                for _ in range(timed):
                    t0 = time.perf_counter()
                    run(ids, mask)
                    times.append(time.perf_counter() - t0)
                model.points[(batch, length)] = statistics.median(times) if times else first
                if first >= max_run_s or time.perf_counter() - start > budget_s:
                    break
            if time.perf_counter() - start > budget_s:
                break
        model.calibration_s = time.perf_counter() - start
        return model

    # -- estimates ---------------------------------------------------------------------------

    def _rows(self) -> dict[int, tuple[list[float], list[float]]]:
        """Per measured batch size, its (log length, log seconds) points; rebuilt on change."""
        if self._cache is None or self._cache[0] != len(self.points):
            rows: dict[int, tuple[list[float], list[float]]] = {}
            for (b, length), s in sorted(self.points.items()):
                xs, ys = rows.setdefault(b, ([], []))
                xs.append(math.log(length))
                ys.append(math.log(s))
            self._cache = (len(self.points), rows)
        return self._cache[1]

    def _at_length(self, batch: int, length: int) -> float:
        """Log-log interpolation along one measured batch row; linear in tokens beyond it."""
        xs, ys = self._rows()[batch]
        x = math.log(length)
        if x >= xs[-1]:
            return math.exp(ys[-1] + x - xs[-1])
        if x <= xs[0]:
            return math.exp(ys[0])  # shorter than the shortest point: not cheaper
        i = bisect.bisect_right(xs, x)
        w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
        return math.exp(ys[i - 1] + w * (ys[i] - ys[i - 1]))

    def cost(self, batch: int, length: int) -> float:
        """Predicted seconds of one run of `batch` windows padded to `length`."""
        if not self.points:
            return 0.0
        batches = list(self._rows())
        lower = max((b for b in batches if b <= batch), default=batches[0])
        upper = min((b for b in batches if b >= batch), default=batches[-1])
        low = self._at_length(lower, length) * (batch / lower if batch < lower else 1.0)
        if upper == lower:
            raw = low * (batch / lower if batch > lower else 1.0)
        else:
            high = self._at_length(upper, length)
            w = (math.log(batch) - math.log(lower)) / (math.log(upper) - math.log(lower))
            raw = math.exp((1 - w) * math.log(low) + w * math.log(high))
        return raw * self.scale

    def gains(self) -> dict[int, float]:
        """Per measured length: batches' windows/s over one window per run, the median over the
        measured batch sizes (a median, not the best: on a noisy host one lucky timing would
        otherwise decide)."""
        ratios: dict[int, list[float]] = {}
        for (batch, length), seconds in self.points.items():
            single = self.points.get((1, length))
            if single is None or batch == 1:
                continue
            ratios.setdefault(length, []).append(batch * single / seconds)
        return {n: statistics.median(r) for n, r in sorted(ratios.items())}

    def policy(self, mode: BatchingMode) -> BatchingPolicy:
        """`on`/`off` as asked; `auto` batches when the median of the lengths' gains is >=
        MIN_GAIN."""
        if mode == "on":
            return BatchingPolicy(mode, True, "batching forced on")
        if mode == "off":
            return BatchingPolicy(mode, False, "batching forced off: one window per run")
        gains = self.gains()
        if not gains:
            return BatchingPolicy(mode, False, "no batch shape measured: one window per run")
        gain = statistics.median(gains.values())
        if gain >= MIN_GAIN:
            return BatchingPolicy(
                mode, True, f"batches run {gain:.2f}x the windows/s of single runs (median)"
            )
        return BatchingPolicy(
            mode,
            False,
            f"batches reach only {gain:.2f}x the windows/s of single runs (median; "
            f"{MIN_GAIN:.2f}x needed): one window per run, at once",
        )

    def best_size(self, lengths: list[int]) -> int:
        """How many of `lengths` (in the order they would join) one run should take: the prefix
        with the most windows per predicted second."""
        best, best_rate, longest = 1, 0.0, 0
        for n, length in enumerate(lengths, start=1):
            longest = max(longest, length)
            seconds = self.cost(n, longest)
            rate = n / seconds if seconds > 0 else float(n)
            if rate > best_rate * 1.0001:
                best, best_rate = n, rate
        return best

    # -- updates -----------------------------------------------------------------------------

    def observe(self, batch: int, length: int, seconds: float, weight: float = 0.02) -> None:
        """Fold a real run into `scale` (an exponential mean of observed / predicted)."""
        predicted = self.cost(batch, length) / self.scale if self.points else 0.0
        if predicted <= 0 or seconds <= 0:
            return
        ratio = min(100.0, max(0.01, seconds / predicted))
        self.scale = (1 - weight) * self.scale + weight * ratio
        self.observed_runs += 1

    def describe(self) -> dict[str, Any]:
        """The grid, the gains and the live scale, for /info."""
        return {
            "calibration_seconds": round(self.calibration_s, 3),
            "observed_runs": self.observed_runs,
            "scale": round(self.scale, 3),
            "grid_ms": [
                {"batch": b, "length": n, "ms": round(1000 * s, 3)}
                for (b, n), s in sorted(self.points.items(), key=lambda kv: (kv[0][1], kv[0][0]))
            ],
            "batching_gain_by_length": {str(n): round(g, 3) for n, g in self.gains().items()},
        }


def grid_lengths(n_max: int) -> list[int]:
    """Padded lengths to time: 32, 128, 512, 2,048 ... up to and including n_max."""
    lengths = [n for n in (32, 128, 512, 2048, 8192, 32768) if n < n_max]
    return [*lengths, n_max]


def grid_batches(max_batch_size: int) -> list[int]:
    """Batch sizes to time: 1, 2, 4, 8 ... up to and including max_batch_size."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    if max_batch_size > 1:
        sizes.append(max_batch_size)
    return sizes
