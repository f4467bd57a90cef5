"""Message to model text: the Subject and the decoded body a reader sees, from raw RFC 822 mail or
HTML. The data command and the service both extract through here, so training and serving agree.
"""

from __future__ import annotations

import email
import email.errors
import email.header
import email.policy
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message

from service.htmltext import html_to_text

# Undeclared 8-bit mail of that era is mostly Windows-1252, not UTF-8.
FALLBACK_CHARSET = "cp1252"
_TOO_LARGE = {"too_many_parts", "too_deep", "too_many_bytes", "too_many_tags"}
# Control bytes other than tab, line feed, form feed and carriage return.
_CONTROL = bytes(b for b in range(32) if b not in (9, 10, 12, 13))
_DEFECTS = {
    "NoBoundaryInMultipartDefect": "a multipart part declares no boundary",
    "StartBoundaryNotFoundDefect": "a multipart boundary never appears in its body",
    "CloseBoundaryNotFoundDefect": "a multipart part has no closing boundary",
    "MultipartInvariantViolationDefect": "a part declared multipart is not split into parts",
    "InvalidMultipartContentTransferEncodingDefect": "a multipart part declares a transfer encoding",
    "MissingHeaderBodySeparatorDefect": "no blank line between a part's headers and its body",
    "FirstHeaderLineIsContinuationDefect": "the first header line is a continuation line",
    "MisplacedEnvelopeHeaderDefect": "a 'From ' envelope line inside the headers",
    "InvalidBase64PaddingDefect": "base64 with bad padding (decoded what could be)",
    "InvalidBase64CharactersDefect": "base64 with invalid characters (they were ignored)",
    "InvalidBase64LengthDefect": "base64 of an impossible length (decoded what could be)",
}


@dataclass(frozen=True)
class MailLimits:
    """What one message may hold before extraction refuses it (None: no limit)."""

    max_parts: int | None = None
    max_depth: int | None = None
    max_decoded_bytes: int | None = None
    max_html_tags: int | None = None  # parsing HTML costs about the same per element
    max_control_ratio: float | None = None


UNLIMITED = MailLimits()


class MessageError(ValueError):
    """A message that cannot be turned into text; `code` names why, `too_large` marks limits."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.too_large = code in _TOO_LARGE


@dataclass(frozen=True)
class MimePart:
    """One leaf of the MIME tree: its place in a depth-first walk, type, charset and fate."""

    index: int
    content_type: str
    charset: str | None
    bytes: int | None = None  # decoded size, for parts that were read
    reason: str | None = None  # why the part was skipped


@dataclass(frozen=True)
class Extraction:
    """The model text of one input and how it was obtained."""

    text: str
    subject: str
    parts_used: list[MimePart] = field(default_factory=list)
    parts_skipped: list[MimePart] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class _Walk:
    """State of one extraction: part numbers, decoded bytes so far, what was used and skipped."""

    def __init__(self, msg: Message, limits: MailLimits) -> None:
        self.limits = limits
        self.index = {id(part): i for i, part in enumerate(msg.walk())}
        self.decoded = 0
        self.used: list[MimePart] = []
        self.skipped: list[MimePart] = []
        self.warnings: list[str] = []

    def number(self, msg: Message) -> int:
        return self.index.get(id(msg), -1)

    def part(self, msg: Message, size: int | None = None, reason: str | None = None) -> MimePart:
        ctype, charset = msg.get_content_type(), msg.get_content_charset()
        return MimePart(self.number(msg), ctype, charset, size, reason)

    def skip(self, msg: Message, reason: str) -> None:
        leaves = [sub for sub in msg.walk() if not sub.is_multipart()]
        self.skipped.extend(self.part(sub, reason=reason) for sub in leaves)

    def decode(self, part: Message) -> str:
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            payload = str(part.get_payload()).encode("utf-8", "replace")
        self.decoded += len(payload)
        cap = self.limits.max_decoded_bytes
        if cap is not None and self.decoded > cap:
            raise MessageError(
                "too_many_bytes",
                f"the text parts decode to more than {cap} bytes (a small encoded part can "
                "decode to a large one)",
            )
        text, note = _decode(payload, part.get_content_charset())
        self.used.append(self.part(part, size=len(payload)))
        if note:
            self.warnings.append(f"part {self.number(part)}: {note}")
        return text


def _decode(payload: bytes, charset: str | None) -> tuple[str, str | None]:
    """The text of a part's bytes, and a note when its charset did not simply work."""
    # A declared charset comes first, then UTF-8. Undeclared 8-bit mail of that era is mostly
    # Windows-1252: decoding it as UTF-8 with replacement turned curly quotes into U+FFFD.
    problem = None
    if charset:
        try:
            return payload.decode(charset), None
        except LookupError:
            problem = f"unknown charset {charset!r}"
        except ValueError:
            problem = f"the text is not valid {charset!r}"
    try:
        text = payload.decode("utf-8")
    except ValueError:
        pass
    else:
        return text, (f"{problem}; decoded as UTF-8" if problem else None)
    if charset and charset.replace("-", "").replace("_", "") not in ("usascii", "ascii"):
        try:
            return payload.decode(charset, errors="replace"), f"{problem}; bad bytes replaced"
        except LookupError:
            pass
    if problem is None and charset is None:
        problem = "undeclared 8-bit text"
    return payload.decode(FALLBACK_CHARSET, errors="replace"), f"{problem}; read as Windows-1252"


def _subparts(msg: Message) -> list[Message]:
    payload = msg.get_payload()
    return [p for p in payload if isinstance(p, Message)] if isinstance(payload, list) else []


def _text_parts(msg: Message, walk: _Walk) -> Iterator[tuple[str, str]]:
    """(content type, decoded text) of the parts a reader would see; plain preferred in alternatives."""
    if msg.is_multipart():
        parts = _subparts(msg)
        if msg.get_content_subtype() == "alternative":
            by_type = {p.get_content_type(): p for p in parts}
            chosen = next((by_type[t] for t in ("text/plain", "text/html") if t in by_type), None)
            if chosen is None and parts:
                chosen = parts[0]
            for p in parts:
                if p is not chosen:
                    walk.skip(p, "an alternative to the part that was read")
            if chosen is not None:
                yield from _text_parts(chosen, walk)
            return
        for p in parts:
            yield from _text_parts(p, walk)
        return
    if msg.get_content_maintype() == "multipart":  # declared multipart, but no parts were found
        walk.skip(msg, "a multipart part that could not be split into parts")
        return
    if msg.get_content_maintype() != "text":
        walk.skip(msg, "not text")
        return
    if (msg.get("Content-Disposition") or "").lower().startswith("attachment"):
        walk.skip(msg, "an attachment")
        return
    yield msg.get_content_type(), walk.decode(msg)


def clean_text(text: str) -> str:
    """Line endings unified, NULs dropped, runs of spaces and blank lines collapsed, stripped."""
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


def _html(html: str, limits: MailLimits) -> str:
    cap = limits.max_html_tags
    if cap is not None and html.count("<") > cap:
        raise MessageError("too_many_tags", f"an HTML part has more than {cap} tags")
    return html_to_text(html)


def _check_shape(msg: Message, limits: MailLimits) -> None:
    # Iterative, so a deeply nested message cannot exhaust the stack before it is refused.
    stack: list[tuple[Message, int]] = [(msg, 0)]
    parts = 0
    while stack:
        part, depth = stack.pop()
        parts += 1
        if limits.max_parts is not None and parts > limits.max_parts:
            raise MessageError("too_many_parts", f"more than {limits.max_parts} MIME parts")
        if limits.max_depth is not None and depth > limits.max_depth:
            raise MessageError(
                "too_deep", f"MIME parts nested more than {limits.max_depth} levels deep"
            )
        stack.extend((sub, depth + 1) for sub in _subparts(part))


def _check_binary(raw: bytes, limits: MailLimits) -> None:
    ratio = limits.max_control_ratio
    if ratio is None or not raw:
        return
    if b"\x00" in raw:
        raise MessageError("binary", "the input holds NUL bytes: binary data, not a mail message")
    control = len(raw) - len(raw.translate(None, _CONTROL))
    if control > ratio * len(raw):
        raise MessageError(
            "binary",
            f"{control / len(raw):.0%} of the input is control bytes: binary data, not a mail "
            "message",
        )


def _defects(msg: Message, walk: _Walk) -> None:
    seen: set[str] = set()
    for part in msg.walk():
        for defect in part.defects:
            name = type(defect).__name__
            note = _DEFECTS.get(name, re.sub(r"(?<!^)(?=[A-Z])", " ", name).lower())
            if name not in seen:
                seen.add(name)
                walk.warnings.append(f"malformed MIME: {note}")


def extract_message(
    raw: bytes, limits: MailLimits = UNLIMITED, *, need_text: bool = False
) -> Extraction:
    """Subject + decoded body text of a raw RFC 822 message; routing headers are dropped.

    Routing headers (Received, From, To, ...) leak the label in the SpamAssassin corpus (ham was
    received through the corpus maintainer's own servers), so the model never reads them. With
    `need_text`, a message without a readable text part raises MessageError("no_text_part").
    """
    _check_binary(raw, limits)
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.compat32)
        _check_shape(msg, limits)
        walk = _Walk(msg, limits)
        body = [
            _html(text, limits) if ctype == "text/html" else text
            for ctype, text in _text_parts(msg, walk)
        ]
        subject = _subject(msg)
        _defects(msg, walk)
    except RecursionError as exc:
        raise MessageError("too_deep", "MIME parts nested too deeply to parse") from exc
    if not msg.keys():
        walk.warnings.append("no headers: the whole input was read as a plain-text body")
    if need_text and not walk.used:
        skipped = ", ".join(sorted({p.content_type for p in walk.skipped})) or "none"
        problems = "".join(f"; {w}" for w in walk.warnings)
        raise MessageError(
            "no_text_part",
            f"the message has no text part to classify (its parts: {skipped}){problems}",
        )
    text = clean_text(f"{subject}\n\n" + "\n\n".join(body))
    if need_text and not text:
        raise MessageError("empty", "the message has no subject and its text parts are empty")
    return Extraction(text, subject, walk.used, walk.skipped, walk.warnings)


def extract_html(html: str, limits: MailLimits = UNLIMITED) -> Extraction:
    """The visible text of an HTML document, as a text/html mail body is read."""
    size = len(html.encode("utf-8", "replace"))
    if limits.max_decoded_bytes is not None and size > limits.max_decoded_bytes:
        raise MessageError("too_many_bytes", f"the HTML is over {limits.max_decoded_bytes} bytes")
    try:
        text = clean_text(_html(html, limits))
    except RecursionError as exc:
        raise MessageError("too_deep", "HTML elements nested too deeply to parse") from exc
    return Extraction(text, "", [MimePart(0, "text/html", "utf-8", size)])


def message_text(raw: bytes) -> str:
    """Subject + decoded body text of a raw message, with no limits (what the data command keeps)."""
    return extract_message(raw).text
