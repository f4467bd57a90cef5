"""Evidence: exact character spans of the windows a text was read by, their scores, finer
paragraph windows for one-window texts, over HTTP and in batch-job lines."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service_testing import make_settings, serving, train_tokenizer
from tokenizers import Tokenizer

from service.app import create_app
from service.documents import DocumentEncoder
from service.evidence import char_span, segment_spans, token_ends, window_spans

SHIPPED = Path(__file__).resolve().parents[2] / "model" / "artifacts" / "spamassassin-linformer"


def _tokenizers() -> list[Tokenizer]:
    found = [train_tokenizer()]
    if (SHIPPED / "tokenizer.json").is_file():
        found.append(Tokenizer.from_file(str(SHIPPED / "tokenizer.json")))
    return found


TOKENIZERS = _tokenizers()

# Mail-like text: words, punctuation, runs of spaces and newlines, control characters the
# normalizer drops, accents, compatibility characters NFKC rewrites, and emoji that byte-level
# BPE splits into several tokens.
ALPHABET = st.sampled_from(
    [
        *"abcdefghij KLMNO.,!?$%\n\n\t  -'\"0123",
        *["\x01", "\x7f", "\xa0", "é", "ü", "ß", "ﬁ", "①", "Ａ", "😀", "中", "\u0301", "\r\n"],
    ]
)
TEXTS = st.lists(ALPHABET, min_size=1, max_size=400).map("".join)


def _inside_a_character(text: str, offsets: list[tuple[int, int]], boundary: int) -> bool:
    """Whether a window boundary before token `boundary` falls inside one character: byte-level
    BPE can split a character's bytes over two tokens (their offsets overlap), and NFKC joins a
    combining accent to the letter before it. No span of characters can hold half of one."""
    if not 0 < boundary < len(offsets):
        return False
    at = offsets[boundary - 1][1]
    split = offsets[boundary][0] < at
    return split or (at < len(text) and unicodedata.combining(text[at]) != 0)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    text=TEXTS,
    which=st.integers(0, len(TOKENIZERS) - 1),
    n_max=st.integers(1, 64),
    overlap_share=st.floats(0, 0.9),
)
def test_each_window_span_is_exactly_the_text_its_tokens_came_from(
    text: str, which: int, n_max: int, overlap_share: float
) -> None:
    tokenizer = TOKENIZERS[which]
    [(ids, offsets)] = DocumentEncoder(tokenizer).encode_offsets([text])
    if ids.size == 0:
        return
    ends = token_ends(offsets, len(text))
    overlap = min(n_max - 1, int(n_max * overlap_share))
    spans = window_spans(ends, n_max, overlap, truncated=False)
    spans += segment_spans(text, ends, max_segments=8)
    assert spans[0].start == 0 and max(s.end for s in spans) == len(text)
    for span in spans:
        assert 0 <= span.start <= span.end <= len(text)
        assert (span.start, span.end) == char_span(ends, span.token_start, span.token_end)
        if any(_inside_a_character(text, offsets, b) for b in (span.token_start, span.token_end)):
            continue
        window = ids[span.token_start : span.token_end].tolist()
        assert tokenizer.decode(window) == tokenizer.normalizer.normalize_str(
            text[span.start : span.end]
        ), (span, text[span.start : span.end])


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=TEXTS)
def test_token_spans_tile_the_text(text: str) -> None:
    [(ids, offsets)] = DocumentEncoder(TOKENIZERS[-1]).encode_offsets([text])
    if ids.size == 0:
        return
    ends = token_ends(offsets, len(text))
    pieces = [text[slice(*char_span(ends, i, i + 1))] for i in range(ids.size)]
    assert "".join(pieces) == text


def test_paragraphs_of_a_short_text_become_finer_spans() -> None:
    text = "Subject: hi\n\nFirst paragraph here.\n\n  Second one, longer than that.\n"
    [(_, offsets)] = DocumentEncoder(train_tokenizer()).encode_offsets([text])
    spans = segment_spans(text, token_ends(offsets, len(text)), max_segments=8)
    assert [s.kind for s in spans] == ["paragraph"] * 3
    assert "First paragraph here." in text[spans[1].start : spans[1].end]
    assert spans[-1].end == len(text)
    assert len(segment_spans(text, token_ends(offsets, len(text)), max_segments=2)) == 2
    one = "a single sentence without a break"
    [(_, offsets)] = DocumentEncoder(train_tokenizer()).encode_offsets([one])
    assert segment_spans(one, token_ends(offsets, len(one)), max_segments=8) == []


async def test_classify_returns_evidence_sorted_with_offsets_into_the_input(
    fake_client: httpx.AsyncClient,
) -> None:
    long = " ".join(["Win a free prize now, click here to claim your reward!"] * 12)
    short = "Lunch at noon? The usual place.\n\nCheap meds, no prescription, act now."
    r = await fake_client.post(
        "/v1/classify", json={"input": [long, short], "return_evidence": True}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    first, second = body["results"]
    assert first["chunks"] > 1
    windows = first["evidence"]
    assert len(windows) == first["chunks"] and {w["kind"] for w in windows} == {"window"}
    assert [w["score"] for w in windows] == sorted((w["score"] for w in windows), reverse=True)
    assert min(w["start"] for w in windows) == 0 and max(w["end"] for w in windows) == len(long)
    # The document's score is its most flagged window's (max aggregation).
    assert windows[0]["scores"] == first["scores"]
    kinds = [e["kind"] for e in second["evidence"]]
    assert kinds.count("window") == 1 and kinds.count("paragraph") == 2
    assert body["usage"]["evidence_windows"] == 2
    assert body["usage"]["evidence_tokens"] == second["tokens"]

    plain = (await fake_client.post("/v1/classify", json={"input": short})).json()
    assert "evidence" not in plain["results"][0] and "evidence_windows" not in plain["usage"]
    assert plain["results"][0]["scores"] == second["scores"]


async def test_email_evidence_indexes_the_extracted_text(fake_client: httpx.AsyncClient) -> None:
    message = "Subject: Offer\nContent-Type: text/plain\n\nHello.\n\nCheap meds, act now.\n"
    r = await fake_client.post(
        "/v1/classify",
        json={"input": message, "input_format": "email", "return_evidence": True},
    )
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    text = result["extraction"]["text"]
    assert text.startswith("Offer")
    assert any(
        text[e["start"] : e["end"]].strip() == "Cheap meds, act now." for e in result["evidence"]
    )
    raw = await fake_client.post(
        "/v1/classify?return_evidence=true",
        content=message.encode(),
        headers={"content-type": "message/rfc822"},
    )
    assert raw.json()["results"][0]["evidence"] == result["evidence"]


async def test_batch_lines_return_evidence(fake_client: httpx.AsyncClient) -> None:
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/classify",
        "body": {"input": "Hello there.\n\nWin a free prize now!", "return_evidence": True},
    }
    upload = await fake_client.post(
        "/v1/files",
        files={"file": ("in.jsonl", json.dumps(line).encode() + b"\n")},
        data={"purpose": "batch"},
    )
    assert upload.status_code == 200, upload.text
    batch = await fake_client.post(
        "/v1/batches",
        json={
            "input_file_id": upload.json()["id"],
            "endpoint": "/v1/classify",
            "completion_window": "24h",
        },
    )
    assert batch.status_code == 200, batch.text
    for _ in range(500):
        state = (await fake_client.get(f"/v1/batches/{batch.json()['id']}")).json()
        if state["status"] == "completed":
            break
        await _sleep()
    else:
        raise AssertionError(f"batch never completed: {state}")
    out = await fake_client.get(f"/v1/files/{state['output_file_id']}/content")
    answer = json.loads(out.text.splitlines()[0])["response"]["body"]
    assert [e["kind"] for e in answer["results"][0]["evidence"]].count("paragraph") == 2


async def _sleep() -> None:
    import asyncio

    await asyncio.sleep(0.02)


CORPUS = Path(__file__).resolve().parents[2] / "data" / "spamassassin"


def _corpus(sample: Path) -> tuple[list[str], list[str]]:
    """Easy ham and spam texts: the full corpus split where `linmod-data` wrote it, else the
    committed sample."""
    data = CORPUS if (CORPUS / "test.jsonl").is_file() else sample
    splits = ["test"] if data == CORPUS else ["train", "validation", "test"]
    # Not splitlines(): texts may hold U+2028, which JSON lines leave unescaped.
    rows = [
        json.loads(line)
        for split in splits
        for line in (data / f"{split}.jsonl").read_text(encoding="utf-8").split("\n")
        if line
    ]
    ham = [r["text"] for r in rows if r["label"] == "ham" and r["group"].startswith("easy")]
    spam = [r["text"] for r in rows if r["label"] == "spam"]
    return ham, spam


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / "model.onnx").exists(), reason="no shipped model here")
async def test_the_top_window_of_a_long_message_covers_its_spam_passage(tiny_data: Path) -> None:
    """About 30,000 characters of ham with one spam passage inside: the most suspect window is
    the one holding most of the passage; when the shipped model flags the message, that window
    is flagged and none away from the passage is."""
    settings = make_settings(SHIPPED, device="cpu", jobs=False, warmup=False, request_timeout_s=600)
    ham, spam = _corpus(tiny_data)
    async with serving(create_app(settings)) as client:

        async def spam_scores(texts: list[str]) -> list[float]:
            out = []
            for i in range(0, len(texts), 16):
                r = await client.post("/v1/classify", json={"input": texts[i : i + 16]})
                out += [x["scores"]["spam"] for x in r.json()["results"]]
            return out

        ham = ham[:60]
        ham = [t for t, s in zip(ham, await spam_scores(ham), strict=True) if s < 0.01]
        # Passages of 8,000 to 16,000 characters: one long spam message where the corpus has
        # them, else consecutive ones.
        passages = [t for t in spam if 8000 <= len(t) <= 16000][:6]
        if not passages:
            joined = "\n\n".join(sorted(spam, key=len, reverse=True))
            passages = [joined[i : i + 12000] for i in range(0, min(len(joined), 36000), 12000)]
        passages = [
            t for t, s in zip(passages, await spam_scores(passages), strict=True) if s > 0.99
        ]
        before = "\n\n".join(ham)[:15000]
        after = "\n\n".join(reversed(ham))[:15000]
        flagged = 0
        for passage in passages[:4]:
            text = f"{before}\n\n{passage}\n\n{after}"
            start, end = len(before) + 2, len(before) + 2 + len(passage)
            r = await client.post("/v1/classify", json={"input": text, "return_evidence": True})
            result = r.json()["results"][0]
            evidence = result["evidence"]
            assert result["chunks"] >= 3 and len(evidence) == result["chunks"]

            def share(e: dict[str, int], lo: int = start, hi: int = end) -> int:
                return max(0, min(e["end"], hi) - max(e["start"], lo))

            # Flagged or not, the most suspect window is the one holding most of the passage.
            assert share(evidence[0]) == max(share(e) for e in evidence), (evidence, start, end)
            if result["flagged"]:
                flagged += 1
                assert evidence[0]["flagged"]
                assert not any(e["flagged"] for e in evidence if share(e) == 0), evidence
        assert flagged >= 1, "the model flagged none of the assembled messages"
