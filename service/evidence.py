"""Evidence: where in the text each window the model read lies (exact character offsets), with
its scores; for a one-window text, finer paragraph or sentence windows run in the same engine call.
"""

from __future__ import annotations

import bisect
import itertools
import re
from dataclasses import dataclass

import numpy as np

from service.artifact import FloatArray, IntArray
from service.documents import window_starts

EvidenceKind = str  # "window", "paragraph" or "sentence"

_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n\s*")


@dataclass(frozen=True)
class Span:
    """Tokens [token_start, token_end) of a document and the characters [start, end) they came
    from; `kind` says whether the model's own window or a finer one."""

    kind: EvidenceKind
    token_start: int
    token_end: int
    start: int
    end: int


@dataclass(frozen=True)
class EvidenceItem:
    """One span's verdict."""

    kind: EvidenceKind
    start: int
    end: int
    tokens: int
    score: float  # the highest flag-label probability
    scores: dict[str, float]
    flagged: bool


def token_ends(offsets: list[tuple[int, int]], text_len: int) -> IntArray:
    """The character each token's span ends at. Token i came from characters
    [ends[i - 1], ends[i]) (the first from 0, the last up to the text's end), so the spans tile
    the text: what the normalizer dropped or merged belongs to the token that follows it."""
    ends = np.fromiter((o[1] for o in offsets), dtype=np.int64, count=len(offsets))
    if ends.size:
        ends = np.maximum.accumulate(ends)
        ends[-1] = text_len
    return ends


def char_span(ends: IntArray, token_start: int, token_end: int) -> tuple[int, int]:
    """Characters [start, end) of tokens [token_start, token_end)."""
    start = int(ends[token_start - 1]) if token_start > 0 else 0
    return start, int(ends[token_end - 1])


def window_spans(ends: IntArray, n_max: int, overlap: int, *, truncated: bool) -> list[Span]:
    """The spans of the windows a document of len(ends) tokens is classified by."""
    length = int(ends.size)
    starts = [0] if truncated else window_starts(length, n_max, overlap)
    spans = []
    for s in starts:
        e = min(length, s + n_max)
        spans.append(Span("window", s, e, *char_span(ends, s, e)))
    return spans


def _cuts(text: str) -> tuple[EvidenceKind, list[int]]:
    """Where paragraphs (or, in a single paragraph, sentences) begin, after the first."""
    cuts = [m.end() for m in _PARAGRAPH.finditer(text) if 0 < m.end() < len(text)]
    if cuts:
        return "paragraph", cuts
    return "sentence", [m.end() for m in _SENTENCE.finditer(text) if 0 < m.end() < len(text)]


def segment_spans(text: str, ends: IntArray, max_segments: int) -> list[Span]:
    """Paragraph (else sentence) spans of a one-window document, at most `max_segments` of them
    (neighbours merged evenly past that); [] when the text is a single segment."""
    kind, cuts = _cuts(text)
    if not cuts or ends.size < 2:
        return []
    # Token i belongs to the segment holding the last character of its span.
    segment = [bisect.bisect_right(cuts, max(int(e) - 1, 0)) for e in ends]
    bounds = [0] + [i for i in range(1, len(segment)) if segment[i] != segment[i - 1]]
    bounds.append(len(segment))
    groups = len(bounds) - 1
    if groups < 2:
        return []
    if groups > max_segments:
        keep = np.linspace(0, groups, max_segments + 1).round().astype(int)
        bounds = [bounds[i] for i in keep]
    return [Span(kind, a, b, *char_span(ends, a, b)) for a, b in itertools.pairwise(bounds)]


def evidence_items(
    spans: list[Span],
    probs: FloatArray,
    labels: list[str],
    flag_indices: list[int],
    threshold: float,
) -> list[EvidenceItem]:
    """Items for spans and their probabilities [spans, labels], highest flag score first
    (ties: earlier text first)."""
    items = []
    for span, row in zip(spans, probs, strict=True):
        flag = float(row[flag_indices].max())
        items.append(
            EvidenceItem(
                kind=span.kind,
                start=span.start,
                end=span.end,
                tokens=span.token_end - span.token_start,
                score=flag,
                scores={label: float(p) for label, p in zip(labels, row, strict=True)},
                flagged=flag >= threshold,
            )
        )
    items.sort(key=lambda item: (-item.score, item.start))
    return items
