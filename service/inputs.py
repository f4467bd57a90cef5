"""Inputs in the form a client sent them (text, raw mail, HTML) to the texts the model reads, with
what was extracted; the HTTP routes and batch-job lines share it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import asdict

from service.errors import ApiError
from service.mailtext import Extraction, MailLimits, MessageError, extract_html, extract_message
from service.schemas import ExtractionInfo, InputFormat, MimePartInfo
from service.settings import Settings

log = logging.getLogger(__name__)

# Real mail holds a few control bytes at most (the corpus: under 4%); more is not text.
MAX_CONTROL_RATIO = 0.1


def mail_limits(settings: Settings) -> MailLimits:
    """The limits one message or HTML document is extracted under."""
    return MailLimits(
        max_parts=settings.mail_max_parts,
        max_depth=settings.mail_max_depth,
        max_decoded_bytes=settings.mail_max_decoded_bytes,
        max_html_tags=settings.mail_max_html_tags,
        max_control_ratio=MAX_CONTROL_RATIO,
    )


def message_bytes(item: str | bytes) -> bytes:
    """A message as bytes: JSON strings carry it as text, taken as UTF-8."""
    return item if isinstance(item, bytes) else item.encode("utf-8", "replace")


def extract_one(item: str | bytes, input_format: InputFormat, limits: MailLimits) -> Extraction:
    """Extract one email or HTML input; raises MessageError."""
    if input_format == "html":
        html = item.decode("utf-8", "replace") if isinstance(item, bytes) else item
        extraction = extract_html(html, limits)
        if not extraction.text:
            raise MessageError("empty", "the HTML has no visible text")
        return extraction
    return extract_message(message_bytes(item), limits, need_text=True)


def _extract_all(
    items: Sequence[str | bytes], input_format: InputFormat, limits: MailLimits
) -> list[Extraction]:
    out = []
    for i, item in enumerate(items):
        try:
            out.append(extract_one(item, input_format, limits))
        except MessageError as exc:
            status, reason = (413, "too_large") if exc.too_large else (422, "invalid")
            raise ApiError(status, f"input[{i}]: {exc}", code=exc.code, reason=reason) from exc
        except Exception as exc:
            # The mail and HTML parsers are lenient, but a client's bytes must never become a 500.
            log.warning("input could not be extracted", exc_info=exc)
            raise ApiError(
                422, f"input[{i}]: the {input_format} input cannot be parsed "
                f"({type(exc).__name__})", code="malformed_input", reason="invalid",
            ) from exc  # fmt: skip
    return out


async def extract_inputs(
    items: Sequence[str | bytes], input_format: InputFormat, settings: Settings
) -> tuple[list[str], list[Extraction | None]]:
    """The model texts of the inputs and, for email and HTML, their extractions (413/422 on
    inputs that cannot be read). Parsing runs in a thread so the event loop keeps serving."""
    if input_format == "text":
        return [i if isinstance(i, str) else i.decode() for i in items], [None] * len(items)
    if len(items) > settings.max_inputs:  # before any parsing work
        raise ApiError(
            413, f"{len(items)} inputs is over the limit of {settings.max_inputs} per request",
            code="too_many_inputs", reason="too_large",
        )  # fmt: skip
    extractions = await asyncio.to_thread(_extract_all, items, input_format, mail_limits(settings))
    return [e.text for e in extractions], list(extractions)


def extraction_info(extraction: Extraction | None) -> ExtractionInfo | None:
    """The API's view of an extraction (None for text inputs)."""
    if extraction is None:
        return None
    return ExtractionInfo(
        subject=extraction.subject,
        chars=len(extraction.text),
        parts_used=[MimePartInfo(**asdict(p)) for p in extraction.parts_used],
        parts_skipped=[MimePartInfo(**asdict(p)) for p in extraction.parts_skipped],
        warnings=extraction.warnings,
    )
