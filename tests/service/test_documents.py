"""Tokenizing, fitting documents to n_max (chunk, truncate, reject) and aggregating windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from service_testing import train_tokenizer

from service.artifact import softmax
from service.documents import (
    DocumentEncoder,
    DocumentTooLongError,
    EmptyDocumentError,
    aggregate,
    plan_document,
    window_starts,
)


@given(
    n_max=st.integers(1, 512),
    data=st.data(),
)
def test_windows_cover_the_document_with_the_overlap(n_max: int, data: st.DataObject) -> None:
    overlap = data.draw(st.integers(0, n_max - 1))
    length = data.draw(st.integers(1, 20 * n_max))
    starts = window_starts(length, n_max, overlap)
    ends = [min(s + n_max, length) for s in starts]
    assert starts[0] == 0 and ends[-1] == length
    if length > n_max:
        assert all(e - s == n_max for s, e in zip(starts, ends, strict=True))
    for (s1, e1), s2 in zip(zip(starts, ends, strict=True), starts[1:], strict=False):
        assert s1 < s2 and e1 - s2 >= overlap  # consecutive windows share >= overlap tokens
    # No window is wasted: without the last one the end would be missed.
    assert len(starts) == 1 or starts[-2] + n_max < length


def test_policies() -> None:
    ids = np.arange(1, 101, dtype=np.int64)
    short = plan_document(0, ids[:10], 64, "reject", 8)
    assert len(short.windows) == 1 and short.tokens == 10 and not short.truncated

    chunked = plan_document(0, ids, 64, "chunk", 16)
    assert [w[0] for w in chunked.windows] == [1, 37]
    assert chunked.tokens == 100 and not chunked.truncated

    truncated = plan_document(0, ids, 64, "truncate", 16)
    assert len(truncated.windows) == 1 and truncated.truncated
    np.testing.assert_array_equal(truncated.windows[0], ids[:64])

    with pytest.raises(DocumentTooLongError, match=r"input 3 has 100 tokens.*limit of 64"):
        plan_document(3, ids, 64, "reject", 16)
    with pytest.raises(EmptyDocumentError, match="input 1 has no tokens"):
        plan_document(1, ids[:0], 64, "chunk", 16)


def test_aggregation() -> None:
    probs = softmax(np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]], dtype=np.float32))
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-6)
    # max: the whole vector of the window most likely to be flagged (label 1).
    np.testing.assert_array_equal(aggregate(probs, [1], "max"), probs[1])
    np.testing.assert_allclose(aggregate(probs, [1], "mean"), probs.mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(aggregate(probs[:1], [1], "mean"), probs[0])


def test_encoder_adds_nothing_and_cuts_nothing(tmp_path: Path) -> None:
    tokenizer = train_tokenizer()
    tokenizer.enable_truncation(8)  # a tokenizer.json may carry this; the service ignores it
    tokenizer.enable_padding(length=32)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    encoder = DocumentEncoder.from_file(tmp_path / "tokenizer.json")
    text = "Win a free prize now, click here to claim your reward! " * 3
    (ids,) = encoder.encode([text])
    assert ids.dtype == np.int64 and ids.size > 8 and 0 not in ids  # no pad, no truncation
    tokenizer.no_truncation()
    tokenizer.no_padding()
    assert ids.tolist() == tokenizer.encode(text, add_special_tokens=False).ids
