"""Email and HTML inputs over HTTP: input_format, message/rfc822 bodies, batch lines, limits and
bad mail as clear 4xx errors while the server keeps serving."""

from __future__ import annotations

import base64
import json
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from typing import Any

import httpx
import pytest
from jobs_testing import jsonl, parse_lines, upload, wait_for
from service_testing import make_settings, serving

from service.app import create_app
from service.artifact import ArtifactConfig
from service.engine import FakeEngine

MAIL = {"content-type": "message/rfc822"}


def _message() -> bytes:
    msg = MIMEMultipart("mixed")
    msg["Received"] = "from relay.example by mx.example"
    msg["Subject"] = "=?utf-8?q?Lunch_=E2=80=93_Thursday?="
    alt = MIMEMultipart("alternative")
    alt.attach(MIMEText("Meeting moved to Thursday; the agenda is attached.", "plain", "utf-8"))
    alt.attach(MIMEText("<p>Meeting <b>moved</b></p>", "html", "utf-8"))
    msg.attach(alt)
    pdf = MIMEText("", "plain")
    pdf.replace_header("Content-Type", "application/pdf")
    msg.attach(pdf)
    return msg.as_bytes()


EXPECTED_TEXT = "Lunch \u2013 Thursday\n\nMeeting moved to Thursday; the agenda is attached."


def _without_extraction(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "extraction"}


async def still_serving(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/classify", json={"input": "still there?"})
    assert response.status_code == 200, response.text


async def test_an_email_is_classified_as_its_extracted_text(fake_client: httpx.AsyncClient) -> None:
    raw = _message()
    as_text = await fake_client.post("/v1/classify", json={"input": EXPECTED_TEXT})
    as_json = await fake_client.post(
        "/v1/classify", json={"input": raw.decode(), "input_format": "email"}
    )
    as_mail = await fake_client.post("/v1/classify", content=raw, headers=MAIL)
    for response in (as_text, as_json, as_mail):
        assert response.status_code == 200, response.text
    (text_result,) = as_text.json()["results"]
    assert "extraction" not in text_result  # text inputs answer as they always did
    for response in (as_json, as_mail):
        (result,) = response.json()["results"]
        assert _without_extraction(result) == text_result
        extraction = result["extraction"]
        assert extraction["subject"] == "Lunch \u2013 Thursday"
        assert extraction["chars"] == len(EXPECTED_TEXT)
        assert [(p["content_type"], p["charset"]) for p in extraction["parts_used"]] == [
            ("text/plain", "utf-8")
        ]
        assert {p["content_type"]: p["reason"] for p in extraction["parts_skipped"]} == {
            "text/html": "an alternative to the part that was read",
            "application/pdf": "not text",
        }
        assert extraction["warnings"] == []


async def test_a_raw_message_takes_its_options_as_query_parameters(
    fake_client: httpx.AsyncClient,
) -> None:
    long = b"Subject: long\n\n" + b"Win a free prize now, click here! " * 40
    chunked = await fake_client.post("/v1/classify", content=long, headers=MAIL)
    assert chunked.status_code == 200 and chunked.json()["results"][0]["chunks"] > 1
    truncated = await fake_client.post(
        "/v1/classify?long_document=truncate", content=long, headers=MAIL
    )
    result = truncated.json()["results"][0]
    assert result["chunks"] == 1 and result["truncated"]
    refused = await fake_client.post(
        "/v1/classify", params={"long_document": "reject"}, content=long, headers=MAIL
    )
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "document_too_long"
    bad = await fake_client.post("/v1/classify?long_document=summarize", content=long, headers=MAIL)
    assert bad.status_code == 422
    mixed = await fake_client.post("/v1/classify?aggregation=mean", json={"input": "hi"})
    assert mixed.status_code == 422 and "JSON body" in mixed.json()["error"]["message"]
    other = await fake_client.post(
        "/v1/classify", content=b"hi", headers={"content-type": "text/plain"}
    )
    assert other.status_code == 415
    assert "application/json or message/rfc822" in other.json()["error"]["message"]
    empty = await fake_client.post("/v1/classify", content=b"\n", headers=MAIL)
    assert empty.status_code == 422 and empty.json()["error"]["code"] == "empty"


async def test_html_and_moderations_take_an_input_format(fake_client: httpx.AsyncClient) -> None:
    html = "<html><body><p>Buy <i>now</i></p><script>x()</script></body></html>"
    as_html = await fake_client.post("/v1/classify", json={"input": html, "input_format": "html"})
    as_text = await fake_client.post("/v1/classify", json={"input": "Buy now"})
    (result,) = as_html.json()["results"]
    assert _without_extraction(result) == as_text.json()["results"][0]
    assert result["extraction"]["chars"] == len("Buy now")
    assert result["extraction"]["parts_used"][0]["content_type"] == "text/html"

    raw = _message().decode()
    moderated = await fake_client.post(
        "/v1/moderations",
        json={"input": [raw, {"type": "text", "text": raw}], "input_format": "email"},
    )
    assert moderated.status_code == 200, moderated.text
    direct = await fake_client.post("/v1/moderations", json={"input": EXPECTED_TEXT})
    (plain,) = direct.json()["results"]
    assert "extraction" not in plain
    for result in moderated.json()["results"]:
        assert _without_extraction(result) == plain
        assert result["extraction"]["subject"] == "Lunch \u2013 Thursday"
    unknown = await fake_client.post("/v1/moderations", json={"input": "x", "input_format": "pdf"})
    assert unknown.status_code == 422 and "input_format" in unknown.json()["error"]["message"]


def _nested(depth: int) -> bytes:
    raw = b"Content-Type: text/plain\n\ninnermost\n"
    for level in range(depth):
        b = f"b{level}".encode()
        raw = b'Content-Type: multipart/mixed; boundary="' + b + b'"\n\n--' + b + b"\n" + raw
        raw += b"\n--" + b + b"--\n"
    return b"Subject: deep\n" + raw


def _many_parts(n: int) -> bytes:
    msg = MIMEMultipart("mixed")
    for i in range(n):
        msg.attach(MIMEText(f"part {i}", "plain"))
    return msg.as_bytes()


def _image_only() -> bytes:
    msg = MIMEMultipart("mixed")
    msg["Subject"] = "Look"
    picture = MIMEText("", "plain")
    picture.replace_header("Content-Type", "image/png")
    msg.attach(picture)
    return msg.as_bytes()


_B64 = base64.encodebytes(b"free money " * 2000).decode()  # 22,000 bytes decoded
BAD_MAIL = [
    (_many_parts(30), 413, "too_many_parts", "more than 20 MIME parts"),
    (_nested(7), 413, "too_deep", "nested more than 5 levels"),
    (_nested(3000), 413, "too_deep", "nested too deeply"),
    (
        f"Subject: b\nContent-Transfer-Encoding: base64\n\n{_B64}".encode(),
        413,
        "too_many_bytes",
        "decode to more than 10000 bytes",
    ),
    (MIMEText("<p>x</p>" * 300, "html").as_bytes(), 413, "too_many_tags", "more than 500 tags"),
    (bytes(range(256)) * 8, 422, "binary", "binary data"),
    (_image_only(), 422, "no_text_part", "no text part to classify (its parts: image/png)"),
    (
        b"Subject: A\nContent-Type: multipart/mixed\n\nno parts\n",
        422,
        "no_text_part",
        "declares no boundary",
    ),
    (b"Content-Type: text/plain\n\n \n", 422, "empty", "text parts are empty"),
]


@pytest.mark.parametrize(("raw", "status", "code", "fragment"), BAD_MAIL)
async def test_limits_and_bad_mail_are_clear_4xx_and_the_server_keeps_serving(
    fake_artifact: Path,
    model_config: ArtifactConfig,
    raw: bytes,
    status: int,
    code: str,
    fragment: str,
) -> None:
    settings = make_settings(
        fake_artifact, mail_max_parts=20, mail_max_depth=5, mail_max_decoded_bytes=10_000,
        mail_max_html_tags=500,
    )  # fmt: skip
    async with serving(create_app(settings, engine=FakeEngine(model_config))) as client:
        as_mail = await client.post("/v1/classify", content=raw, headers=MAIL)
        assert as_mail.status_code == status, as_mail.text
        error = as_mail.json()["error"]
        assert error["code"] == code and fragment in error["message"], error
        assert error["message"].startswith("input[0]: ")
        await still_serving(client)
        metrics = (await client.get("/metrics")).text
        reason = "too_large" if status == 413 else "invalid"
        assert f'linmod_rejections_total{{reason="{reason}"}} 1.0' in metrics


async def test_malformed_but_readable_mail_is_classified_with_warnings(
    fake_client: httpx.AsyncClient,
) -> None:
    unclosed = (
        b'Subject: B\nContent-Type: multipart/mixed; boundary="XX"\n\n--XX\n'
        b"Content-Type: text/plain; charset=x-unknown\n\nJ\xf8rgen, never closed\n"
    )
    response = await fake_client.post("/v1/classify", content=unclosed, headers=MAIL)
    assert response.status_code == 200, response.text
    extraction = response.json()["results"][0]["extraction"]
    assert extraction["chars"] == len("B\n\nJ\u00f8rgen, never closed")
    assert "part 1: unknown charset 'x-unknown'; read as Windows-1252" in extraction["warnings"]
    assert "malformed MIME: a multipart part has no closing boundary" in extraction["warnings"]
    headless = await fake_client.post("/v1/classify", content=b"just text\n", headers=MAIL)
    assert any("no headers" in w for w in headless.json()["results"][0]["extraction"]["warnings"])


async def test_openapi_documents_the_formats_and_the_raw_message_body(
    fake_client: httpx.AsyncClient,
) -> None:
    spec = (await fake_client.get("/openapi.json")).json()
    body = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "message/rfc822"}
    formats = body["application/json"]["schema"]["properties"]["input_format"]
    assert formats["enum"] == ["text", "email", "html"] and formats["default"] == "text"
    params = {p["name"] for p in spec["paths"]["/v1/classify"]["post"]["parameters"]}
    assert params == {"long_document", "aggregation", "return_evidence", "model"}
    schemas = spec["components"]["schemas"]
    assert "input_format" in schemas["ModerationRequest"]["properties"]
    assert {"subject", "chars", "parts_used", "parts_skipped", "warnings"} <= set(
        schemas["ExtractionInfo"]["properties"]
    )
    assert "extraction" in schemas["ClassifyResult"]["properties"]


async def test_batch_lines_take_an_input_format(
    fake_artifact: Path, model_config: ArtifactConfig
) -> None:
    raw = _message().decode()
    bodies: list[Any] = [
        {"input": raw, "input_format": "email"},
        {"input": _image_only().decode(), "input_format": "email"},
    ]
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/classify", "body": body}
        for i, body in enumerate(bodies)
    ]
    settings = make_settings(fake_artifact, job_poll_s=0.01, job_claim_lines=8)
    async with serving(create_app(settings, engine=FakeEngine(model_config))) as client:
        uploaded = await upload(client, jsonl(lines))
        created = await client.post(
            "/v1/batches",
            json={"input_file_id": uploaded.json()["id"], "endpoint": "/v1/classify",
                  "completion_window": "24h"},
        )  # fmt: skip
        done = await wait_for(client, created.json()["id"])
        assert done["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
        for file_id in (done["output_file_id"], done["error_file_id"]):
            got = await client.get(f"/v1/files/{file_id}/content")
            (line,) = parse_lines(got.content)
            direct = await client.post("/v1/classify", json=bodies[int(line["custom_id"][1:])])
            answer = line["response"]
            assert answer["status_code"] == direct.status_code
            assert json.dumps(answer["body"].get("results")) == json.dumps(
                direct.json().get("results")
            )
            assert answer["body"].get("error") == direct.json().get("error")
