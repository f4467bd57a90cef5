"""POST /v1/files bodies: multipart/form-data parsed as it streams, the file checked line by line
and stored in small transactions, so an upload is never held whole in memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from service.errors import ApiError
from service.jobs.jsonl import FileRejectedError, JsonlSplitter
from service.jobs.records import FileRecord, Quota, QuotaExceededError, quota_message
from service.jobs.store import JobStore
from service.settings import Settings
from service.texts import clean_filename

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

UPLOAD_OVERHEAD = 1024 * 1024  # multipart headers and small fields, over the file's own limit
FLUSH_LINES = 1000
FLUSH_BYTES = 1024 * 1024
MAX_FIELD_BYTES = 1024
MAX_PARTS = 8  # purpose and file, and a few a client may add; never thousands
MAX_HEADER_BYTES = 16 * 1024  # of one part's headers


class _Form:
    """Callbacks of the multipart parser: the `file` part goes to the splitter as it arrives,
    other fields (purpose) are kept, small."""

    def __init__(self, splitter: JsonlSplitter) -> None:
        self.splitter = splitter
        self.fields: dict[str, bytearray] = {}
        self.filename: str | None = None
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._part: str | None = None  # the field now streaming; "file" for the file
        self._parts = 0
        self._header_bytes = 0

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda data, start, end: self._header(
                self._header_name, data[start:end]
            ),
            "on_header_value": lambda data, start, end: self._header(
                self._header_value, data[start:end]
            ),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._end,
        }

    def _begin(self) -> None:
        self._disposition = b""
        self._header_bytes = 0
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise FileRejectedError(
                400, f"the form has more than {MAX_PARTS} fields", "invalid_multipart"
            )

    def _header(self, into: bytearray, data: bytes) -> None:
        self._header_bytes += len(data)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise FileRejectedError(
                400, f"a form part's headers are over {MAX_HEADER_BYTES} bytes", "invalid_multipart"
            )
        into.extend(data)

    def _header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name == "file":
            if self.filename is not None:
                raise FileRejectedError(400, "send one file per upload", "invalid_multipart")
            self.filename = clean_filename(options.get(b"filename", b"").decode("utf-8", "replace"))
        self._part = name
        self.fields.setdefault(name, bytearray())

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._part == "file":
            self.splitter.feed(data[start:end])
            return
        field = self.fields[self._part or ""]
        field.extend(data[start:end])
        if len(field) > MAX_FIELD_BYTES:
            raise FileRejectedError(
                400,
                f"form field {self._part!r} is over {MAX_FIELD_BYTES} bytes",
                "invalid_multipart",
            )

    def _end(self) -> None:
        if self._part == "purpose":
            self.check_purpose()  # before the file arrives, when sent first (as clients do)
        self._part = None

    def check_purpose(self) -> None:
        purpose = self.fields.get("purpose")
        if purpose is None:
            raise FileRejectedError(400, "the form field 'purpose' is required", "missing_purpose")
        value = purpose.decode("utf-8", "replace")
        if value != "batch":
            raise FileRejectedError(
                400,
                f"purpose must be 'batch', not {value!r}: this server keeps files for batch jobs only",
                "invalid_purpose",
            )


async def receive_file(
    request: Request, store: JobStore, owner: str | None, settings: Settings
) -> FileRecord:
    """Parse, check and store an upload; 4xx ApiErrors for what is refused (nothing is kept)."""
    declared = request.headers.get("content-type", "")
    mime, params = parse_options_header(declared)
    if mime != b"multipart/form-data":
        raise ApiError(
            415, f"Content-Type must be multipart/form-data (fields purpose and file), not "
            f"{declared or 'missing'!r}", code="unsupported_media_type", reason="invalid",
        )  # fmt: skip
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "the multipart body has no boundary", code="invalid_multipart")
    splitter = JsonlSplitter(
        max_bytes=settings.job_max_file_bytes,
        max_lines=settings.job_max_file_lines,
        max_line_bytes=settings.max_body_bytes,  # a request may be as large as over HTTP
    )
    form = _Form(splitter)
    quota = Quota(files=settings.job_quota_files, bytes=settings.job_quota_bytes)
    file_id: str | None = None
    room = 0
    try:
        parser = MultipartParser(boundary, form.callbacks())
        async for chunk in request.stream():
            parser.write(chunk)
            if form.filename is not None and file_id is None:
                file_id, room = await store.db.run(store.begin_file, owner, form.filename, quota)
            if file_id and splitter.bytes > room:
                used = quota.bytes - room
                raise QuotaExceededError(quota_message(used, quota), "storage_quota_exceeded")
            if file_id and (
                len(splitter.ready) >= FLUSH_LINES or splitter.ready_bytes >= FLUSH_BYTES
            ):
                await store.db.run(store.add_lines, file_id, splitter.take())
        parser.finalize()
        if file_id is None:
            raise FileRejectedError(400, "the form field 'file' is required", "missing_file")
        form.check_purpose()
        splitter.finish()
        await store.db.run(store.add_lines, file_id, splitter.take())
        return await store.db.run(
            store.complete_file,
            file_id,
            size=splitter.bytes,
            lines=splitter.requests,
            ttl_s=settings.job_retention_s,
            quota=quota,
        )
    except BaseException as exc:
        if file_id is not None:
            await store.db.run(store.discard_file, file_id)
        if isinstance(exc, FileRejectedError):
            reason = "too_large" if exc.status == 413 else "invalid"
            raise ApiError(exc.status, exc.message, code=exc.code, reason=reason) from exc
        if isinstance(exc, QuotaExceededError):
            raise ApiError(403, str(exc), code=exc.code, reason="invalid") from exc
        if isinstance(exc, FormParserError):
            message = f"malformed multipart body: {exc}"
            raise ApiError(400, message, code="invalid_multipart", reason="invalid") from exc
        if isinstance(exc, ClientDisconnect):
            raise ApiError(499, "the client closed the request", code="client_closed") from exc
        raise
