"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from service.settings import Aggregation, LongDocumentPolicy
from service.texts import SafeStr, check_text


def _check_text(value: str, where: str) -> None:
    if not value:
        raise ValueError(f"{where} is an empty string")
    check_text(value, where)


def check_input(value: Any, parts: bool = False) -> Any:
    """One clear message for a malformed `input`, rather than one per union branch."""
    if isinstance(value, str):
        _check_text(value, "input")
        return value
    if not isinstance(value, list):
        kind = "a string or a list of strings" + (" or text parts" if parts else "")
        raise ValueError(f"input must be {kind}, not {type(value).__name__}")
    if not value:
        raise ValueError("input is an empty list")
    for i, item in enumerate(value):
        if isinstance(item, str):
            _check_text(item, f"input[{i}]")
        elif parts and isinstance(item, dict) and item.get("type") == "text":
            if isinstance(item.get("text"), str):
                _check_text(item["text"], f"input[{i}].text")
        elif parts and isinstance(item, dict):
            raise ValueError(f"input[{i}]: only text parts are supported, not {item.get('type')!r}")
        else:
            raise ValueError(f"input[{i}] must be a string, not {type(item).__name__}")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


InputFormat = Literal["text", "email", "html"]
INPUT_FORMAT_DESCRIPTION = (
    "what each input is: text (classified as sent), email (a raw RFC 822 message; characters "
    "outside ASCII are taken as UTF-8, so send 8-bit mail in other charsets as a message/rfc822 "
    "body) or html (read as a mail client shows it). Email and HTML go through the extraction the "
    "model was trained on: Subject and decoded body text, routing headers dropped"
)


class ClassifyRequest(_Strict):
    """One text or a list of texts, with optional per-request long-document handling."""

    input: Annotated[str | list[str], BeforeValidator(check_input)] = Field(
        description="a text, or a list of texts classified independently",
        examples=["Win a free prize now!", ["first text", "second text"]],
    )
    long_document: LongDocumentPolicy | None = Field(
        None, description="texts over n_max tokens: chunk, truncate or reject (server default)"
    )
    aggregation: Aggregation | None = Field(
        None, description="how chunk scores combine: max or mean (server default)"
    )
    input_format: InputFormat = Field("text", description=INPUT_FORMAT_DESCRIPTION)
    model: SafeStr | None = Field(
        None, description="the model to use (GET /v1/models lists them); default: the server's"
    )
    return_evidence: bool = Field(
        False,
        description="also return, per text, every window's character span [start, end) and "
        "scores, most flagged first; a text of one window gets its paragraphs (or sentences) "
        "scored too, as extra windows of the same engine run (counted in usage)",
    )


class MimePartInfo(BaseModel):
    """One leaf of a message's MIME tree."""

    index: int = Field(description="its place in a depth-first walk of the message (0: the top)")
    content_type: str
    charset: str | None = Field(description="the declared charset, if any")
    bytes: int | None = Field(None, description="decoded size, for parts that were read")
    reason: str | None = Field(None, description="why the part was skipped")


class ExtractionInfo(BaseModel):
    """What the model read of an email or HTML input."""

    subject: str = Field(description="the decoded Subject header ('' for HTML)")
    chars: int = Field(description="characters of the text classified (subject and body)")
    parts_used: list[MimePartInfo] = Field(description="the text parts that were read")
    parts_skipped: list[MimePartInfo] = Field(
        description="attachments, non-text parts and alternatives not read"
    )
    warnings: list[str] = Field(
        description="what was malformed or guessed (charsets, boundaries, base64)"
    )
    text: str | None = Field(
        None,
        description="with return_evidence: the extracted text, which evidence offsets index",
        exclude_if=lambda value: value is None,
    )


class Evidence(BaseModel):
    """A span of the text and the model's verdict on it alone."""

    kind: Literal["window", "paragraph", "sentence"] = Field(
        description="window: one the model read the text by (chunks); paragraph or sentence: a "
        "finer span of a one-window text"
    )
    start: int = Field(description="first character (Python string index, code points)")
    end: int = Field(description="one past the last character: text[start:end] is the span")
    tokens: int = Field(description="tokens in the span")
    score: float = Field(description="its highest flag-label probability (the sort key)")
    scores: dict[str, float] = Field(description="probability of every label")
    flagged: bool = Field(description="score reached the model's threshold")


class ClassifyResult(BaseModel):
    """The verdict on one text."""

    label: str = Field(description="the most probable label")
    score: float = Field(description="its probability")
    scores: dict[str, float] = Field(description="probability of every label")
    flagged: bool = Field(description="a flag label reached the threshold")
    tokens: int = Field(description="tokens in the whole text")
    chunks: int = Field(description="windows the text was classified by")
    truncated: bool = Field(description="only the first n_max tokens were read")
    extraction: ExtractionInfo | None = Field(
        None,
        description="for email and HTML inputs: what was extracted (absent for text)",
        exclude_if=lambda value: value is None,
    )
    evidence: list[Evidence] | None = Field(
        None,
        description="with return_evidence: every span, highest flag score first; offsets index "
        "the input as sent or, for email and HTML, extraction.text",
        exclude_if=lambda value: value is None,
    )


class Usage(BaseModel):
    """What the request cost."""

    tokens: int
    chunks: int
    evidence_windows: int | None = Field(
        None,
        description="with return_evidence: finer windows run besides the chunks",
        exclude_if=lambda value: value is None,
    )
    evidence_tokens: int | None = Field(
        None,
        description="with return_evidence: tokens of those finer windows",
        exclude_if=lambda value: value is None,
    )


class ClassifyResponse(BaseModel):
    """Results in input order."""

    id: str
    object: Literal["classification"] = "classification"
    model: str
    results: list[ClassifyResult]
    usage: Usage


class TextPart(_Strict):
    """The text element of OpenAI's multi-modal moderation input."""

    type: Literal["text"]
    text: str


class ModerationRequest(_Strict):
    """The OpenAI moderation request; `model` is accepted and the served model answers."""

    input: Annotated[
        str | list[str | TextPart], BeforeValidator(lambda v: check_input(v, parts=True))
    ] = Field(description="a text, a list of texts, or a list of {type: text, text} parts")
    model: SafeStr | None = Field(
        None, description="the model to use (GET /v1/models lists them); default: the server's"
    )
    input_format: InputFormat = Field("text", description=INPUT_FORMAT_DESCRIPTION)

    def texts(self) -> list[str]:
        """The input as a list of plain texts."""
        if isinstance(self.input, str):
            return [self.input]
        return [part if isinstance(part, str) else part.text for part in self.input]


class Moderation(BaseModel):
    """One result, keyed by the model's flag labels (its moderation categories)."""

    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[Literal["text"]]]
    extraction: ExtractionInfo | None = Field(
        None,
        description="for email and HTML inputs: what was extracted (absent for text)",
        exclude_if=lambda value: value is None,
    )


class ModerationResponse(BaseModel):
    """The OpenAI moderation response."""

    id: str
    model: str
    results: list[Moderation]


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "malformed JSON or body",
        401: "missing or wrong API key",
        413: "too many inputs, a text too long, or a body too large",
        415: "the body is not application/json",
        422: "well-formed JSON that is not a valid request",
        429: "the queue is full; see Retry-After",
        503: "the model is not ready yet, or the server is shutting down",
        504: "the request's deadline passed",
    }.items()
}
