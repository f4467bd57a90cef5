"""Texts in, one result per document out: tokenize off the loop, fit to n_max, batch, aggregate.

The HTTP routes and the batch-jobs worker both classify through `Classifier.classify`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from service.admission import CharGate
from service.artifact import ArtifactConfig, IntArray, softmax
from service.batcher import DeadlineExceededError, DynamicBatcher, Priority, QueueFullError
from service.documents import DocumentEncoder, aggregate, plan_document
from service.evidence import (
    EvidenceItem,
    Span,
    evidence_items,
    segment_spans,
    token_ends,
    window_spans,
)
from service.metrics import Metrics
from service.settings import Aggregation, LongDocumentPolicy
from service.threadnames import name_this_thread

T = TypeVar("T")


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
    evidence: list[EvidenceItem] | None = None  # when asked for: every span, most flagged first


@dataclass(frozen=True)
class Classification:
    """Results in input order, and where the request's time went."""

    results: list[DocumentResult]
    tokenize_s: float
    queue_s: float
    inference_s: float
    evidence_windows: int = 0  # finer (paragraph, sentence) windows run besides the model's own
    evidence_tokens: int = 0  # and their tokens


class Classifier:
    """Owns the tokenizer threads; shares the batcher with every other caller."""

    def __init__(
        self,
        encoder: DocumentEncoder,
        batcher: DynamicBatcher,
        metrics: Metrics,
        config: ArtifactConfig,
        *,
        chunk_overlap: int,
        aggregation: Aggregation = "max",
        tokenizer_threads: int = 2,
        max_tokenize_chars: int = 1_000_000,
        evidence_segments: int = 16,
        gate: CharGate | None = None,
        inline_tokenize_chars: int = 0,
    ) -> None:
        if not 0 <= chunk_overlap < config.n_max:
            raise ValueError(f"chunk_overlap must be below n_max={config.n_max}")
        self._encoder = encoder
        self._batcher = batcher
        self._metrics = metrics
        self.config = config
        self.chunk_overlap = chunk_overlap
        self.aggregation = aggregation
        self.evidence_segments = evidence_segments
        self.inline_chars = inline_tokenize_chars
        self._flags = config.flag_indices
        self._executor = ThreadPoolExecutor(
            tokenizer_threads, thread_name_prefix="linmod-tokenize", initializer=name_this_thread
        )
        # Several models share one gate: the tokenizer threads' budget is the process's.
        self.gate = gate if gate is not None else CharGate(max_tokenize_chars)

    async def classify(
        self,
        texts: Sequence[str],
        *,
        long_document: LongDocumentPolicy,
        aggregation: Aggregation | None = None,
        priority: Priority = Priority.INTERACTIVE,
        deadline: float | None = None,
        wait_for_room: bool = False,
        evidence: bool = False,
    ) -> Classification:
        """Classify texts; raises DocumentError subclasses and the batcher's errors, with
        QueueFullError when the tokenizer's budget is taken and `wait_for_room` is false.
        With `evidence`, each result lists its windows' character spans and scores, and a
        one-window text its paragraphs' or sentences', run in the same batch."""
        start = time.perf_counter()
        self._batcher.note_incoming(1)  # a partial batch may wait for these windows
        try:
            async with asyncio.timeout_at(deadline):
                if evidence:
                    encoded = await self._tokenize(
                        texts, wait_for_room, self._encoder.encode_offsets
                    )
                    ids = [doc for doc, _ in encoded]
                else:
                    ids = await self._tokenize(texts, wait_for_room, self._encoder.encode)
        except TimeoutError:
            self._metrics.rejections.labels("deadline").inc()
            raise DeadlineExceededError(
                "the request's deadline passed while it was tokenized"
            ) from None
        finally:
            self._batcher.note_incoming(-1)
        tokenize_s = time.perf_counter() - start
        self._metrics.tokenize_duration.observe(tokenize_s)

        n_max = self.config.n_max
        plans = [
            plan_document(i, doc, n_max, long_document, self.chunk_overlap)
            for i, doc in enumerate(ids)
        ]
        windows = [w for plan in plans for w in plan.windows]
        spans: list[list[Span]] = []
        finer: list[IntArray] = []
        if evidence:
            for plan, text, (doc, offsets) in zip(plans, texts, encoded, strict=True):
                ends = token_ends(offsets, len(text))
                doc_spans = window_spans(ends, n_max, self.chunk_overlap, truncated=plan.truncated)
                if len(doc_spans) == 1 and not plan.truncated:
                    segments = segment_spans(text, ends, self.evidence_segments)
                    finer.extend(doc[s.token_start : s.token_end] for s in segments)
                    doc_spans += segments
                spans.append(doc_spans)
        submitted = await self._batcher.submit(
            windows + finer, priority=priority, deadline=deadline, wait_for_room=wait_for_room
        )
        probs = softmax(submitted.logits)
        how = aggregation or self.aggregation
        results, offset, extra = [], 0, len(windows)
        for i, plan in enumerate(plans):
            n = len(plan.windows)
            doc_probs = aggregate(probs[offset : offset + n], self._flags, how)
            found = None
            if evidence:
                k = len(spans[i]) - n
                rows = np.concatenate([probs[offset : offset + n], probs[extra : extra + k]])
                extra += k
                found = evidence_items(
                    spans[i], rows, self.config.labels, self._flags, self.config.threshold
                )
            offset += n
            results.append(self._result(doc_probs, plan.tokens, n, plan.truncated, found))
        self._metrics.documents.inc(len(plans))
        self._metrics.chunks.inc(len(windows))
        return Classification(
            results, tokenize_s, submitted.queue_s, submitted.inference_s,
            evidence_windows=len(finer), evidence_tokens=sum(int(w.size) for w in finer),
        )  # fmt: skip

    async def _tokenize(
        self,
        texts: Sequence[str],
        wait_for_room: bool,
        encode: Callable[[Sequence[str]], list[T]],
    ) -> list[T]:
        """Token ids, once the texts' characters fit the tokenizer's budget; they are held until
        the thread has finished, even when the caller has gone, so the budget bounds real work."""
        chars = sum(len(t) for t in texts)
        if chars <= self.inline_chars and self._batcher.idle(requests=1):
            # On an idle server a short text costs less to tokenize here than the two thread
            # hops would add to its latency; under load the loop has other work to do.
            self.gate.admit_size(chars)
            return encode(texts)
        if wait_for_room:
            self.gate.admit_size(chars)
            await self.gate.budget.acquire(chars)
        else:
            try:
                self.gate.admit(chars)
            except QueueFullError:
                self._metrics.rejections.labels("queue_full").inc()
                raise
        loop = asyncio.get_running_loop()
        began = time.perf_counter()

        def finished(_: object) -> None:
            self.gate.observe(chars, time.perf_counter() - began)
            # A closed loop (the server stopped) has nobody left to admit.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.gate.budget.release, chars)

        future = self._executor.submit(encode, texts)
        future.add_done_callback(finished)
        return await asyncio.wrap_future(future)

    def _result(
        self,
        probs: np.ndarray,
        tokens: int,
        chunks: int,
        truncated: bool,
        evidence: list[EvidenceItem] | None = None,
    ) -> DocumentResult:
        labels = self.config.labels
        best = int(probs.argmax())
        flagged = bool(probs[self._flags].max() >= self.config.threshold)
        scores = {label: float(p) for label, p in zip(labels, probs, strict=True)}
        return DocumentResult(
            labels[best], float(probs[best]), scores, flagged, tokens, chunks, truncated, evidence
        )

    def close(self) -> None:
        """Stop the tokenizer threads."""
        self._executor.shutdown(wait=False)
