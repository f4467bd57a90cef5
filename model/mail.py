"""Mail parsing: the subject and the text a reader sees, from a raw RFC 822 message.

Routing headers (Received, From, To, ...) are dropped: in the SpamAssassin corpus they leak the
label (ham was received through the corpus maintainer's own servers).
"""

from __future__ import annotations

import email
import email.errors
import email.header
import email.policy
import re
from collections.abc import Iterator
from email.message import Message

_BLOCK_TAGS = [
    "p",
    "div",
    "br",
    "tr",
    "li",
    "ul",
    "ol",
    "table",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "blockquote",
    "pre",
    "hr",
    "title",
    "center",
    "dd",
    "dt",
    "form",
]


_LINK = re.compile(r"(https?://|ftp://|www\.)\S", re.IGNORECASE)


def html_to_text(html: str) -> str:
    """Visible text of an HTML document, parsed by lxml through BeautifulSoup.

    Block elements end a line; inline elements (b, i, a, font, span) join their neighbours, so
    "Buy <i>now</i>" reads "Buy now" as a client would send it. Scripts, styles and comments go.
    A link keeps its target after its text, "text <http://...>", and an image reads "[image: alt]",
    as mail clients render HTML to plain text: where a message points and that it is pictures are
    part of what a reader sees.
    """
    from bs4 import (
        BeautifulSoup,
        Comment,
        Declaration,
        Doctype,
        NavigableString,
        ProcessingInstruction,
    )

    soup = BeautifulSoup(html, "lxml")
    for tag in soup(["script", "style", "head", "meta"]):
        tag.decompose()
    hidden = (Comment, Doctype, Declaration, ProcessingInstruction)
    for node in soup.find_all(string=lambda s: isinstance(s, hidden)):
        node.extract()
    # Whitespace inside HTML text renders as one space (outside <pre>), as a browser shows it.
    for node in soup.find_all(string=True):
        if type(node) is NavigableString and node.parent is not None and node.parent.name != "pre":
            node.replace_with(re.sub(r"\s+", " ", str(node)))
    for a in soup.find_all("a", href=True):
        href = str(a["href"]).strip()
        if _LINK.match(href) and href not in a.get_text():
            a.append(f" <{href}>")
    for img in soup.find_all("img"):
        alt = " ".join(str(img.get("alt") or "").split())
        img.replace_with(f"[image: {alt}]" if alt else "[image]")
    for tag in soup.find_all(_BLOCK_TAGS):
        tag.insert_after("\n")
    for tag in soup.find_all(["td", "th"]):
        tag.insert_after(" ")
    return soup.get_text()


def _decode_part(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        payload = str(part.get_payload()).encode("utf-8", "replace")
    charset = part.get_content_charset()
    # Undeclared 8-bit mail of that era is mostly Windows-1252, not UTF-8: decoding it as UTF-8
    # with replacement turned every curly quote into U+FFFD. A declared charset comes first.
    for name in (charset, "utf-8"):
        if name:
            try:
                return payload.decode(name)
            except (LookupError, UnicodeDecodeError):  # an unknown name, or a wrong declaration
                pass
    if charset and charset.replace("-", "").replace("_", "") not in ("usascii", "ascii"):
        try:
            return payload.decode(charset, errors="replace")
        except LookupError:
            pass
    return payload.decode("cp1252", errors="replace")


def _text_parts(msg: Message) -> Iterator[tuple[str, str]]:
    """(content type, decoded text) of the parts a reader would see; plain preferred in alternatives."""
    if msg.is_multipart():
        parts = msg.get_payload()
        assert isinstance(parts, list)
        if msg.get_content_subtype() == "alternative":
            by_type = {p.get_content_type(): p for p in parts}
            for preferred in ("text/plain", "text/html"):
                if preferred in by_type:
                    yield from _text_parts(by_type[preferred])
                    return
            for p in parts:
                yield from _text_parts(p)
                return
        for p in parts:
            yield from _text_parts(p)
        return
    if msg.get_content_maintype() != "text":
        return
    if (msg.get("Content-Disposition") or "").lower().startswith("attachment"):
        return
    yield msg.get_content_type(), _decode_part(msg)


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = re.sub(r"[ \t\f\v\u00a0]+", " ", text)
    text = re.sub(r" *\n[ \n]*\n *", "\n\n", text)
    return text.strip()


def _subject(msg: Message) -> str:
    raw = msg.get("Subject", "")
    try:
        parts = email.header.decode_header(str(raw))
        subject = "".join(
            p.decode(cs or "latin-1", errors="replace") if isinstance(p, bytes) else p
            for p, cs in parts
        )
    except (LookupError, ValueError, email.errors.HeaderParseError):
        subject = str(raw)
    return " ".join(subject.split())


def message_text(raw: bytes) -> str:
    """Subject + decoded body text; routing headers (Received, From, To, ...) are dropped."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    body = []
    for ctype, text in _text_parts(msg):
        body.append(html_to_text(text) if ctype == "text/html" else text)
    subject = _subject(msg)
    return _clean(f"{subject}\n\n" + "\n\n".join(body))
