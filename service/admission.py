"""Admission before the expensive steps: a try-acquire budget (TEI's semaphore, in bytes or
characters) that answers 429 with Retry-After at once instead of queueing without bound.

Two gates use it. Large request bodies share a budget of bytes in flight before JSON parsing
(`service.middleware.BodyAdmissionMiddleware`), and texts share a budget of characters waiting for or in the
tokenizer threads (`Classifier`), so a few huge requests cannot starve everyone.
"""

from __future__ import annotations

import asyncio
import math

from service.batcher import QueueFullError, RequestTooLargeError


class Budget:
    """Units (bytes, characters) in flight, at most `limit`; try-acquire, or wait for room."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._room = asyncio.Event()

    def try_acquire(self, n: int) -> bool:
        """Take n units if they fit now."""
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    async def acquire(self, n: int) -> None:
        """Take n units, waiting for room (batch jobs: they are never refused)."""
        n = min(n, self.limit)
        while not self.try_acquire(n):
            self._room.clear()
            await self._room.wait()

    def release(self, n: int) -> None:
        """Give back n units."""
        self.used = max(0, self.used - min(n, self.limit))
        self._room.set()


class CharGate:
    """The tokenizer's budget of characters, with a Retry-After from its measured speed."""

    def __init__(self, limit: int) -> None:
        self.budget = Budget(limit)
        self.chars_per_s = 2_000_000.0  # a first guess; measured from real runs

    def admit_size(self, chars: int) -> None:
        """RequestTooLargeError when `chars` alone are over the budget: they never fit."""
        if chars > self.budget.limit:
            raise RequestTooLargeError(
                f"the request holds {chars} characters, over the limit of {self.budget.limit} "
                "per request; split it into smaller requests"
            )

    def admit(self, chars: int) -> None:
        """Take `chars` now, or raise RequestTooLargeError (never fits) or QueueFullError."""
        self.admit_size(chars)
        if not self.budget.try_acquire(chars):
            wait = math.ceil(self.budget.used / self.chars_per_s)
            raise QueueFullError("the tokenizer is busy", max(1, min(60, wait)))

    def observe(self, chars: int, seconds: float) -> None:
        """A tokenizer run: its speed updates the Retry-After estimate."""
        if chars > 10_000 and seconds > 0:
            self.chars_per_s = 0.8 * self.chars_per_s + 0.2 * (chars / seconds)
