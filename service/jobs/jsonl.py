"""Batch files line by line: checking an upload as it streams, parsing request lines, and the
output and error lines written back, in OpenAI's batch line shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from service.jobs.db import new_id
from service.texts import text_problem

ENDPOINTS = ("/v1/moderations", "/v1/classify")


class FileRejectedError(Exception):
    """An upload refused as a whole: its HTTP status, message and error code."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def _not_jsonl(message: str) -> FileRejectedError:
    return FileRejectedError(
        400, f"{message}: a batch file is JSONL, one JSON request object per line", "invalid_file"
    )


class JsonlSplitter:
    """Cuts an upload into lines as its bytes arrive and checks each: UTF-8 text without NUL
    bytes, a JSON object as the first request, limits on requests, bytes and line length.

    Complete lines wait in `ready` as (line number, text with its newline) for the caller to
    store; at most one partial line is held, so memory stays bounded whatever the file size.
    """

    def __init__(self, *, max_bytes: int, max_lines: int, max_line_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.max_lines = max_lines
        self.max_line_bytes = max_line_bytes
        self.ready: list[tuple[int, str]] = []
        self.ready_bytes = 0
        self.bytes = 0
        self.requests = 0  # non-blank lines
        self.line_no = 0
        self._partial = bytearray()

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the file."""
        self.bytes += len(data)
        if self.bytes > self.max_bytes:
            raise FileRejectedError(
                413, f"the file is over the limit of {self.max_bytes} bytes", "file_too_large"
            )
        self._partial += data
        start = 0
        while (end := self._partial.find(b"\n", start)) != -1:
            self._line(bytes(self._partial[start : end + 1]))
            start = end + 1
        del self._partial[:start]
        if len(self._partial) > self.max_line_bytes:
            self._too_long(self.line_no + 1)

    def finish(self) -> None:
        """The file has ended: check its last line and that it holds a request."""
        if self._partial:
            self._line(bytes(self._partial))
            self._partial.clear()
        if self.requests == 0:
            raise _not_jsonl("the file holds no requests")

    def take(self) -> list[tuple[int, str]]:
        """The complete lines so far, handed over to be stored."""
        lines, self.ready, self.ready_bytes = self.ready, [], 0
        return lines

    def _too_long(self, line_no: int) -> None:
        raise FileRejectedError(
            413,
            f"line {line_no} is over the limit of {self.max_line_bytes} bytes per request",
            "line_too_long",
        )

    def _line(self, raw: bytes) -> None:
        self.line_no += 1
        if len(raw) > self.max_line_bytes:
            self._too_long(self.line_no)
        if b"\x00" in raw:
            raise _not_jsonl(f"line {self.line_no} contains a NUL byte")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _not_jsonl(f"line {self.line_no} is not UTF-8 text") from None
        if text.strip():
            self.requests += 1
            if self.requests > self.max_lines:
                raise FileRejectedError(
                    413,
                    f"the file has more than {self.max_lines} requests, the limit per batch",
                    "too_many_lines",
                )
            if self.requests == 1:
                # Later lines that are not JSON go to the batch's error file; a file whose
                # first request is not JSON is not JSONL at all (CSV, a JSON array, binary).
                try:
                    first = json.loads(text.lstrip("\ufeff"))
                except ValueError:
                    first = None
                if not isinstance(first, dict):
                    raise _not_jsonl(f"line {self.line_no} is not a JSON object")
        self.ready.append((self.line_no, text))
        self.ready_bytes += len(raw)


@dataclass(frozen=True)
class ParsedLine:
    """A request line: the body to send to the endpoint, or why it cannot be sent."""

    custom_id: str | None
    body: str | None  # JSON text
    error_code: str | None = None
    error_message: str | None = None


class LineValidator:
    """Parses a batch's request lines in order; remembers custom_ids to refuse repeats."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._seen: set[str] = set()

    def __call__(self, line_no: int, text: str) -> ParsedLine | None:
        """The parsed line, or None for a blank one."""
        stripped = text.strip().lstrip("\ufeff")
        if not stripped:
            return None
        try:
            request = json.loads(stripped)
        except ValueError as exc:
            return ParsedLine(
                None, None, "invalid_json_line", f"line {line_no}: invalid JSON: {exc}"
            )
        if not isinstance(request, dict):
            kind = type(request).__name__
            return ParsedLine(
                None, None, "invalid_json_line", f"line {line_no}: a {kind}, not a JSON object"
            )
        custom_id = request.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            return ParsedLine(
                None,
                None,
                "missing_custom_id",
                f"line {line_no}: custom_id must be a non-empty string",
            )
        problem = text_problem(custom_id)
        if problem is not None:
            # Not stored as sent: no database column takes it, nor would a client read it back.
            message = f"line {line_no}: custom_id {problem}"
            return ParsedLine(None, None, "invalid_custom_id", message)
        if custom_id in self._seen:
            message = f"line {line_no}: custom_id {custom_id!r} was used before in this batch"
            return ParsedLine(custom_id, None, "duplicate_custom_id", message)
        self._seen.add(custom_id)
        method = request.get("method", "POST")
        if not isinstance(method, str) or method.upper() != "POST":
            message = f"line {line_no}: method must be POST, not {method!r}"
            return ParsedLine(custom_id, None, "invalid_method", message)
        url = request.get("url")
        if url != self.endpoint:
            why = (
                f"does not match the batch's endpoint {self.endpoint!r}"
                if url in ENDPOINTS
                else f"is not an endpoint batches can call ({', '.join(ENDPOINTS)})"
            )
            return ParsedLine(custom_id, None, "invalid_url", f"line {line_no}: url {url!r} {why}")
        if "body" not in request:
            return ParsedLine(custom_id, None, "missing_body", f"line {line_no}: body is missing")
        return ParsedLine(custom_id, json.dumps(request["body"]))


def _dumps(line: dict[str, Any]) -> str:
    return json.dumps(line, separators=(",", ":"))


def response_line(custom_id: str | None, status_code: int, request_id: str, body: Any) -> str:
    """What the endpoint answered, as an output (2xx) or error (otherwise) file line."""
    response = {"status_code": status_code, "request_id": request_id, "body": body}
    return _dumps(
        {"id": new_id("batch_req_"), "custom_id": custom_id, "response": response, "error": None}
    )


def error_line(custom_id: str | None, code: str, message: str) -> str:
    """A request that never reached the endpoint, as an error file line."""
    error = {"code": code, "message": message}
    return _dumps(
        {"id": new_id("batch_req_"), "custom_id": custom_id, "response": None, "error": error}
    )
