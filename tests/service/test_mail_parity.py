"""The shipped model through the real app: every sample message's raw source gets the result its
extracted text gets (same text, tokens and score), as a message/rfc822 body and as JSON email."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from service_testing import make_settings, serving

from model.corpus import read_corpus_tarball
from service.app import create_app
from service.inputs import mail_limits
from service.mailtext import extract_message
from tests.conftest import SAMPLE_TARBALL

SHIPPED = Path(__file__).resolve().parents[2] / "model" / "artifacts" / "spamassassin-linformer"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (SHIPPED / "model.onnx").exists(), reason="the shipped model is not in this checkout"
    ),
]


async def test_raw_mail_gets_the_result_of_the_text_linmod_data_wrote(tiny_data: Path) -> None:
    rows = [
        json.loads(line)
        for split in ("train", "validation", "test")
        for line in (tiny_data / f"{split}.jsonl").read_text().splitlines()
    ]
    raws = {m.id: m.raw for m in read_corpus_tarball(SAMPLE_TARBALL)[0]}
    settings = make_settings(SHIPPED, device="cpu", jobs=False)
    limits = mail_limits(settings)
    flagged = set()
    json_checked = 0
    async with serving(create_app(settings)) as client:
        for row in rows:
            raw = raws[row["id"]]
            assert extract_message(raw, limits, need_text=True).text == row["text"], row["id"]
            as_text = await client.post("/v1/classify", json={"input": row["text"]})
            as_raw = await client.post(
                "/v1/classify", content=raw, headers={"content-type": "message/rfc822"}
            )
            assert as_text.status_code == as_raw.status_code == 200, as_raw.text
            (text_result,) = as_text.json()["results"]
            (raw_result,) = as_raw.json()["results"]
            extraction = raw_result.pop("extraction")
            assert raw_result == text_result, row["id"]  # tokens, chunks, every score, flag
            assert extraction["chars"] == len(row["text"])
            assert row["text"].startswith(extraction["subject"])
            assert extraction["parts_used"], row["id"]
            if raw_result["flagged"]:
                flagged.add(row["label"])
            if raw.isascii():  # JSON carries text; 7-bit mail arrives byte for byte
                as_json = await client.post(
                    "/v1/classify", json={"input": raw.decode(), "input_format": "email"}
                )
                (json_result,) = as_json.json()["results"]
                json_result.pop("extraction")
                assert json_result == text_result, row["id"]
                json_checked += 1
    assert len(rows) > 100 and json_checked > 80
    assert "spam" in flagged  # the real model, really reading the mail
