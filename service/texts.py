"""One check for every text a client sends (inputs, ids, custom_ids, metadata, filenames): what
a tokenizer, a database or an HTTP header cannot hold is refused or cleaned here, in one place.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated
from urllib.parse import quote

from pydantic import AfterValidator

# JSON may carry "\ud800": a lone UTF-16 surrogate is no Unicode text, so no tokenizer, UTF-8
# encoder or database takes it. PostgreSQL's text type refuses NUL as well.
_UNSAFE = re.compile("[\x00\ud800-\udfff]")
# Bidirectional overrides make "exe.txt" show as "txt.exe"; no filename needs them.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
MAX_FILENAME_CHARS = 255
DEFAULT_FILENAME = "upload.jsonl"


def text_problem(value: str) -> str | None:
    """What makes `value` unusable as text, or None when it is fine."""
    if value.isascii():  # a flag of the string, no scan: only a NUL can be wrong (memchr)
        at = value.find("\x00")
        return None if at < 0 else f"contains a NUL character (at {at})"
    found = _UNSAFE.search(value)
    if found is None:
        return None
    char = found.group()
    if char == "\x00":
        return f"contains a NUL character (at {found.start()})"
    return (
        f"contains a lone UTF-16 surrogate U+{ord(char):04X} (at {found.start()}), "
        "which is not valid Unicode text"
    )


def check_text(value: str, where: str) -> str:
    """`value`, or ValueError naming `where` when it holds a NUL or a lone surrogate."""
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(f"{where} {problem}")
    return value


def _safe(value: str) -> str:
    return check_text(value, "the text")


# A str field of a request body, query or path that is stored or echoed: 422 when unsafe.
SafeStr = Annotated[str, AfterValidator(_safe)]


def clean_filename(raw: str | None) -> str:
    """A filename as stored and served: its last path component, without control or
    unassigned characters or lone surrogates, at most 255 characters; a default if empty."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    kept = "".join(
        c for c in name if unicodedata.category(c) not in ("Cc", "Cs", "Cn") and c not in _BIDI
    ).strip()
    if not kept.strip("."):  # "", "." and ".." name no file
        return DEFAULT_FILENAME
    return kept[:MAX_FILENAME_CHARS]


def content_disposition(filename: str) -> str:
    """An attachment header for any stored name (RFC 6266): a plain ASCII `filename` for old
    clients and the exact name as UTF-8 in `filename*` (RFC 5987)."""
    name = clean_filename(filename)
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\%' else "_" for c in name)
    encoded = quote(name.encode("utf-8"), safe="!#$&+-.^_`|~")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"
