"""Message to text: what training reads, pinned on the corpus sample; limits and malformed mail."""

from __future__ import annotations

import base64
import hashlib
import json
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest

from model.corpus import read_corpus_tarball
from service.htmltext import html_to_text
from service.mailtext import (
    MailLimits,
    MessageError,
    extract_html,
    extract_message,
    message_text,
)
from tests.conftest import FIXTURES, SAMPLE_TARBALL

SERVICE_LIMITS = MailLimits(
    max_parts=20, max_depth=5, max_decoded_bytes=10_000, max_html_tags=500, max_control_ratio=0.1
)


def test_sample_texts_match_the_extraction_the_model_was_trained_on() -> None:
    # Hashes of the text the data command wrote for each sample message before the extraction
    # moved into the serving install: the move, and any later change, must not alter a byte.
    expected = json.loads((FIXTURES / "spamassassin-sample-texts.json").read_text())
    messages, _ = read_corpus_tarball(SAMPLE_TARBALL)
    assert {m.id for m in messages} == set(expected)
    for m in messages:
        text = message_text(m.raw)
        assert hashlib.sha256(text.encode()).hexdigest() == expected[m.id], m.id
        # The service's limits change nothing for real mail.
        assert extract_message(m.raw, SERVICE_LIMITS, need_text=True).text == text


def test_message_text_keeps_subject_and_body_and_drops_routing_headers() -> None:
    msg = MIMEMultipart("alternative")
    msg["Received"] = "from mail.example by spamassassin.taint.org"
    msg["Return-Path"] = "<a@b.c>"
    msg["From"] = "sender@example.com"
    msg["Subject"] = "=?iso-8859-1?q?Caf=E9_offer?="
    msg.attach(MIMEText("Plain caf\u00e9 body", "plain", "iso-8859-1"))
    msg.attach(
        MIMEText("<html><body><p>HTML <b>body</b></p><script>x()</script></body></html>", "html")
    )
    text = message_text(msg.as_bytes())
    assert text.startswith("Caf\u00e9 offer\n\n")
    assert "Plain caf\u00e9 body" in text  # plain preferred in an alternative, charset decoded
    for leak in ("Received", "taint.org", "Return-Path", "sender@example.com", "<b>"):
        assert leak not in text


def test_html_only_message_becomes_text_through_a_parser() -> None:
    msg = MIMEText(
        "<html><head><style>p{}</style></head><body><p>Buy&nbsp;<i>now</i></p>"
        "<!-- hidden --></body></html>",
        "html",
        "utf-8",
    )
    msg["Subject"] = "Deal"
    text = message_text(msg.as_bytes())
    assert "Buy now" in text
    assert "<" not in text and "p{}" not in text and "hidden" not in text


def test_html_links_keep_their_target_and_images_their_alt_text() -> None:
    msg = MIMEText(
        '<p>Visit <a href="http://deals.example/x?id=1">our <b>store</b></a> or '
        '<a href="http://same.example">http://same.example</a> '
        '<a href="#top">top</a><img src="a.gif" alt="Free  offer"><img src="b.gif"></p>',
        "html",
        "utf-8",
    )
    msg["Subject"] = "Links"
    text = message_text(msg.as_bytes())
    assert "our store <http://deals.example/x?id=1>" in text
    assert text.count("http://same.example") == 1  # a target already shown is not repeated
    assert "top" in text and "#top" not in text  # only links that lead somewhere
    assert "[image: Free offer][image]" in text


def test_undeclared_8bit_mail_decodes_as_windows_1252_not_replacement_characters() -> None:
    raw = b"Subject: Quote\nContent-Type: text/plain\n\nIt\x92s \x93here\x94\n"
    assert message_text(raw) == "Quote\n\nIt\u2019s \u201chere\u201d"
    utf8 = "Subject: U\nContent-Type: text/plain\n\ncaf\u00e9\n".encode()
    assert message_text(utf8).endswith("caf\u00e9")
    declared = b"Subject: D\nContent-Type: text/plain; charset=koi8-r\n\n\xf0\xd2\xc9\n"
    assert message_text(declared).endswith("\u041f\u0440\u0438")


def test_mail_in_a_legacy_or_unknown_charset_still_parses() -> None:
    raw = (
        b"Subject: Hej\nContent-Type: text/plain; charset=x-unknown-charset\n\nJ\xf8rgen says hi\n"
    )
    assert message_text(raw).startswith("Hej\n\nJ")


def _mixed_message() -> bytes:
    outer = MIMEMultipart("mixed")
    outer["Subject"] = "Report"
    alt = MIMEMultipart("alternative")
    alt.attach(MIMEText("plain words", "plain", "utf-8"))
    alt.attach(MIMEText("<p>html words</p>", "html", "utf-8"))
    outer.attach(alt)
    image = MIMEText("", "plain")
    image.replace_header("Content-Type", "image/gif")
    outer.attach(image)
    notes = MIMEText("attached notes", "plain", "utf-8")
    notes["Content-Disposition"] = "attachment; filename=notes.txt"
    outer.attach(notes)
    return outer.as_bytes()


def test_extraction_reports_the_parts_it_read_and_skipped_and_why() -> None:
    got = extract_message(_mixed_message(), SERVICE_LIMITS, need_text=True)
    assert got.text == "Report\n\nplain words"
    assert got.subject == "Report"
    assert [(p.index, p.content_type, p.charset, p.bytes) for p in got.parts_used] == [
        (2, "text/plain", "utf-8", len(b"plain words"))
    ]
    skipped = {p.content_type: p.reason for p in got.parts_skipped}
    assert skipped == {
        "text/html": "an alternative to the part that was read",
        "image/gif": "not text",
        "text/plain": "an attachment",
    }
    assert got.warnings == []


def test_unknown_and_wrong_charsets_decode_best_effort_with_a_warning() -> None:
    raw = b"Subject: Hej\nContent-Type: text/plain; charset=x-unknown\n\nJ\xf8rgen\n"
    got = extract_message(raw, SERVICE_LIMITS, need_text=True)
    assert got.text == "Hej\n\nJ\u00f8rgen"
    assert got.warnings == ["part 0: unknown charset 'x-unknown'; read as Windows-1252"]
    wrong = b"Subject: W\nContent-Type: text/plain; charset=us-ascii\n\nna\xefve\n"
    got = extract_message(wrong, SERVICE_LIMITS, need_text=True)
    assert got.text == "W\n\nna\u00efve" and "not valid 'us-ascii'" in got.warnings[0]


def test_malformed_mime_is_read_best_effort_and_says_what_was_wrong() -> None:
    # Training skips a multipart body it cannot split, so the service refuses it, saying why.
    no_boundary = b"Subject: A\nContent-Type: multipart/mixed\n\nbody without parts\n"
    with pytest.raises(MessageError, match=r"mixed\); malformed MIME: .*declares no boundary"):
        extract_message(no_boundary, SERVICE_LIMITS, need_text=True)
    unclosed = (
        b'Subject: B\nContent-Type: multipart/mixed; boundary="XX"\n\n--XX\n'
        b"Content-Type: text/plain\n\nfirst part, never closed\n"
    )
    got = extract_message(unclosed, SERVICE_LIMITS, need_text=True)
    assert got.text == "B\n\nfirst part, never closed"
    assert any("no closing boundary" in w for w in got.warnings)
    missing = b'Subject: C\nContent-Type: multipart/mixed; boundary="YY"\n\nno boundary here\n'
    with pytest.raises(MessageError, match="boundary never appears in its body") as info:
        extract_message(missing, SERVICE_LIMITS, need_text=True)
    assert info.value.code == "no_text_part"
    headless = extract_message(b"just a line of text\n", SERVICE_LIMITS, need_text=True)
    assert headless.text == "just a line of text"
    assert any("no headers" in w for w in headless.warnings)


def _nested(depth: int) -> bytes:
    raw = b"Content-Type: text/plain\n\ninnermost\n"
    for level in range(depth):
        b = f"b{level}".encode()
        raw = (
            b'Content-Type: multipart/mixed; boundary="' + b + b'"\n\n--' + b + b"\n" + raw
            + b"\n--" + b + b"--\n"
        )  # fmt: skip
    return b"Subject: deep\n" + raw


def test_limits_on_parts_depth_and_decoded_bytes_refuse_with_a_reason() -> None:
    assert extract_message(_nested(5), SERVICE_LIMITS).text == "deep\n\ninnermost"
    with pytest.raises(MessageError, match="nested more than 5") as info:
        extract_message(_nested(6), SERVICE_LIMITS)
    assert info.value.code == "too_deep" and info.value.too_large
    # Deeper than the parser's own recursion can go: still a clear refusal, not a crash.
    with pytest.raises(MessageError) as info:
        extract_message(_nested(3000), SERVICE_LIMITS)
    assert info.value.code == "too_deep"

    many = MIMEMultipart("mixed")
    for i in range(25):
        many.attach(MIMEText(f"part {i}", "plain"))
    with pytest.raises(MessageError, match="more than 20 MIME parts") as info:
        extract_message(many.as_bytes(), SERVICE_LIMITS)
    assert info.value.code == "too_many_parts"

    body = base64.encodebytes(b"spam " * 4000).decode()  # 20,000 bytes once decoded
    bomb = f"Subject: x\nContent-Type: text/plain\nContent-Transfer-Encoding: base64\n\n{body}"
    with pytest.raises(MessageError, match="more than 10000 bytes") as info:
        extract_message(bomb.encode(), SERVICE_LIMITS)
    assert info.value.code == "too_many_bytes"
    assert extract_message(bomb.encode()).text.startswith("x\n\nspam spam")  # training: no limits


def test_binary_garbage_and_messages_without_text_are_refused() -> None:
    garbage = bytes(range(256)) * 40
    with pytest.raises(MessageError, match="NUL bytes") as info:
        extract_message(garbage, SERVICE_LIMITS)
    assert info.value.code == "binary" and not info.value.too_large
    control = bytes(b % 32 for b in range(1, 2000) if b % 32)
    with pytest.raises(MessageError, match="control bytes"):
        extract_message(control, SERVICE_LIMITS)

    image_only = MIMEMultipart("mixed")
    image_only["Subject"] = "Look"
    picture = MIMEText("", "plain")
    picture.replace_header("Content-Type", "image/png")
    image_only.attach(picture)
    with pytest.raises(MessageError, match=r"no text part.*image/png") as info:
        extract_message(image_only.as_bytes(), SERVICE_LIMITS, need_text=True)
    assert info.value.code == "no_text_part"
    assert extract_message(image_only.as_bytes()).text == "Look"  # what the data command keeps
    with pytest.raises(MessageError) as info:
        extract_message(b"Content-Type: text/plain\n\n \n", SERVICE_LIMITS, need_text=True)
    assert info.value.code == "empty"


def test_html_input_reads_as_a_text_html_mail_body_does() -> None:
    html = "<html><body><p>Buy <i>now</i></p><script>x()</script></body></html>"
    got = extract_html(html)
    msg = MIMEText(html, "html", "utf-8")
    assert got.text == "Buy now" == message_text(msg.as_bytes())
    assert [p.content_type for p in got.parts_used] == ["text/html"] and got.subject == ""
    with pytest.raises(MessageError) as info:
        extract_html("<p>x</p>" * 5000, SERVICE_LIMITS)
    assert info.value.code == "too_many_bytes"


def test_html_structure_reads_as_a_mail_client_renders_it() -> None:
    html = (
        "<table><tr><td>a</td><th>b</th></tr></table><pre>  kept   as\n is</pre>"
        '<a href="http://x.example"><a href="http://y.example">inner</a> outer</a>'
        "<template>hidden template</template><ul><li>one<li>two</ul>"
    )
    # Cells end in a space, rows and tables in a line; <pre> keeps its spaces; lxml closes a link
    # that another opens inside; template text is not shown.
    assert html_to_text(html) == (
        "a b \n\n  kept   as\n is\n <http://x.example>inner <http://y.example> outerone\ntwo\n\n"
    )


def test_many_html_tags_are_refused_before_parsing() -> None:
    page = "<p>x</p>" * 300  # 600 tags
    with pytest.raises(MessageError, match="more than 500 tags") as info:
        extract_html(page, SERVICE_LIMITS)
    assert info.value.code == "too_many_tags" and info.value.too_large
    mail = MIMEText(page, "html", "utf-8").as_bytes()
    with pytest.raises(MessageError, match="more than 500 tags"):
        extract_message(mail, SERVICE_LIMITS)
    assert extract_message(mail).text == "\n".join(["x"] * 300)  # training: no limits
