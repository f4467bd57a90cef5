"""Documents to windows and back: tokenizing, the long-document policies, aggregating scores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from service.artifact import FloatArray, IntArray
from service.settings import Aggregation, LongDocumentPolicy


class DocumentError(ValueError):
    """A document that cannot be classified as sent; `index` is its place in the request."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


class DocumentTooLongError(DocumentError):
    """More tokens than the model takes, under the `reject` policy."""


class EmptyDocumentError(DocumentError):
    """No tokens at all, so nothing to classify."""


@dataclass(frozen=True)
class DocumentPlan:
    """The windows one document is classified by, and what was done to fit it."""

    windows: list[IntArray]
    tokens: int
    truncated: bool


class DocumentEncoder:
    """A Hugging Face tokenizer used without special tokens, truncation or padding."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        # Fitting documents to n_max is the service's job, so undo any truncation or
        # padding that a tokenizer.json may carry.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer

    @classmethod
    def from_file(cls, path: Path) -> DocumentEncoder:
        """Load a tokenizer.json file."""
        return cls(Tokenizer.from_file(str(path)))

    def encode(self, texts: Sequence[str]) -> list[IntArray]:
        """Token ids of each text (blocking: from a worker thread, or on the event loop for a
        short text on an idle server)."""
        # The batch call releases the GIL (the single-text `encode` does not), so the event loop
        # keeps serving while a tokenizer thread works, and it skips the character offsets the
        # single-text call computes (about 20% quicker on one text).
        encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def encode_offsets(self, texts: Sequence[str]) -> list[tuple[IntArray, list[tuple[int, int]]]]:
        """Token ids of each text and each token's character offsets in it (slower than
        `encode`: the tokenizer tracks alignments)."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [(np.asarray(e.ids, dtype=np.int64), e.offsets) for e in encodings]


def window_starts(length: int, n_max: int, overlap: int) -> list[int]:
    """Starts of n_max-token windows covering `length` tokens, neighbours sharing >= overlap.

    The last window is aligned to the end, so every window is full and none is a short tail.
    """
    if length <= n_max:
        return [0]
    stride = n_max - overlap
    starts = [0]
    while starts[-1] + n_max < length:
        starts.append(min(starts[-1] + stride, length - n_max))
    return starts


def plan_document(
    index: int, ids: IntArray, n_max: int, policy: LongDocumentPolicy, overlap: int
) -> DocumentPlan:
    """Fit one tokenized document to the model under a long-document policy."""
    tokens = int(ids.size)
    if tokens == 0:
        raise EmptyDocumentError(index, f"input {index} has no tokens after normalization")
    if tokens <= n_max:
        return DocumentPlan([ids], tokens, truncated=False)
    if policy == "reject":
        raise DocumentTooLongError(
            index,
            f"input {index} has {tokens} tokens, more than the model's limit of {n_max}; "
            "send long_document='chunk' or 'truncate' to classify it anyway",
        )
    if policy == "truncate":
        return DocumentPlan([ids[:n_max]], tokens, truncated=True)
    windows = [ids[s : s + n_max] for s in window_starts(tokens, n_max, overlap)]
    return DocumentPlan(windows, tokens, truncated=False)


def aggregate(probs: FloatArray, flag_indices: Sequence[int], how: Aggregation) -> FloatArray:
    """One probability vector from a document's windows [windows, labels].

    `max` keeps the whole vector of the window whose highest flag probability is largest, so
    the scores stay a distribution; `mean` averages the windows.
    """
    if how == "mean" and probs.shape[0] > 1:
        mean: FloatArray = probs.mean(axis=0).astype(np.float32)
        return mean
    flag_scores = probs[:, list(flag_indices)].max(axis=1)
    chosen: FloatArray = probs[int(flag_scores.argmax())]
    return chosen
