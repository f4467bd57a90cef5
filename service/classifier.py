"""Texts in, one result per document out: tokenize off the loop, fit to n_max, batch, aggregate.

The HTTP routes and the batch-jobs worker both classify through `Classifier.classify`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.batcher import DynamicBatcher, Priority
from service.documents import DocumentEncoder, aggregate, plan_document, softmax
from service.engine import ModelConfig
from service.metrics import Metrics
from service.settings import Aggregation, LongDocumentPolicy


@dataclass(frozen=True)
class DocumentResult:
    """The verdict on one document."""

    label: str
    score: float
    scores: dict[str, float]
    flagged: bool
    tokens: int
    chunks: int
    truncated: bool


@dataclass(frozen=True)
class Classification:
    """Results in input order, and where the request's time went."""

    results: list[DocumentResult]
    tokenize_s: float
    queue_s: float
    inference_s: float


class Classifier:
    """Owns the tokenizer threads; shares the batcher with every other caller."""

    def __init__(
        self,
        encoder: DocumentEncoder,
        batcher: DynamicBatcher,
        metrics: Metrics,
        config: ModelConfig,
        *,
        chunk_overlap: int,
        aggregation: Aggregation = "max",
        tokenizer_threads: int = 2,
    ) -> None:
        if not 0 <= chunk_overlap < config.n_max:
            raise ValueError(f"chunk_overlap must be below n_max={config.n_max}")
        self._encoder = encoder
        self._batcher = batcher
        self._metrics = metrics
        self.config = config
        self.chunk_overlap = chunk_overlap
        self.aggregation = aggregation
        self._flags = config.flag_indices
        self._executor = ThreadPoolExecutor(tokenizer_threads, thread_name_prefix="linmod-tokenize")

    async def classify(
        self,
        texts: Sequence[str],
        *,
        long_document: LongDocumentPolicy,
        aggregation: Aggregation | None = None,
        priority: Priority = Priority.INTERACTIVE,
        deadline: float | None = None,
        wait_for_room: bool = False,
    ) -> Classification:
        """Classify texts; raises DocumentError subclasses and the batcher's errors."""
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        ids = await loop.run_in_executor(self._executor, self._encoder.encode, texts)
        tokenize_s = time.perf_counter() - start
        self._metrics.tokenize_duration.observe(tokenize_s)

        n_max = self.config.n_max
        plans = [
            plan_document(i, doc, n_max, long_document, self.chunk_overlap)
            for i, doc in enumerate(ids)
        ]
        windows = [w for plan in plans for w in plan.windows]
        submitted = await self._batcher.submit(
            windows, priority=priority, deadline=deadline, wait_for_room=wait_for_room
        )
        probs = softmax(submitted.logits)
        how = aggregation or self.aggregation
        results, offset = [], 0
        for plan in plans:
            n = len(plan.windows)
            doc_probs = aggregate(probs[offset : offset + n], self._flags, how)
            offset += n
            results.append(self._result(doc_probs, plan.tokens, n, plan.truncated))
        self._metrics.documents.inc(len(plans))
        self._metrics.chunks.inc(len(windows))
        return Classification(results, tokenize_s, submitted.queue_s, submitted.inference_s)

    def _result(
        self, probs: np.ndarray, tokens: int, chunks: int, truncated: bool
    ) -> DocumentResult:
        labels = self.config.labels
        best = int(probs.argmax())
        flagged = bool(probs[self._flags].max() >= self.config.threshold)
        scores = {label: float(p) for label, p in zip(labels, probs, strict=True)}
        return DocumentResult(
            labels[best], float(probs[best]), scores, flagged, tokens, chunks, truncated
        )

    def close(self) -> None:
        """Stop the tokenizer threads."""
        self._executor.shutdown(wait=False)
