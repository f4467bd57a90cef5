"""`linmod-mail`: classify raw mail from stdin, a file, an mbox or a Maildir, through a running
service or a local model, for procmail, Postfix `pipe` and sieve filters (exit 0 ham, 1 flagged).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mailbox
import os
import re
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx

HAM, FLAGGED, USAGE, REFUSED, TEMPFAIL = 0, 1, 2, 3, 75  # 75: sysexits EX_TEMPFAIL, mail retries
FLAG_HEADER, SCORE_HEADER = b"X-Linmod-Flag", b"X-Linmod-Score"
_HEADER_LINE = re.compile(rb"^[!-9;-~]+:")
_OURS = re.compile(rb"^(X-Linmod-Flag|X-Linmod-Score)\s*:", re.IGNORECASE)


class MailClientError(Exception):
    """A message was not classified; `code` is the exit status that says why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Verdict:
    """The service's answer on one message: flagged, the highest flag-label score, the result."""

    flagged: bool
    score: float
    result: dict[str, Any]


def tag_message(raw: bytes, verdict: Verdict) -> bytes:
    """The message with X-Linmod-Flag and X-Linmod-Score on top, any earlier ones removed."""
    newline = b"\r\n" if raw.split(b"\n", 1)[0].endswith(b"\r") else b"\n"
    lines = raw.splitlines(keepends=True)
    envelope = [lines.pop(0)] if lines and lines[0].startswith(b"From ") else []
    headers: list[bytes] = []
    while lines and lines[0].strip() and (_HEADER_LINE.match(lines[0]) or lines[0][:1] in b" \t"):
        headers.append(lines.pop(0))
    kept, dropping = [], False
    for line in headers:  # a sender's own X-Linmod headers (and their continuations) go
        dropping = bool(_OURS.match(line)) or (dropping and line[:1] in b" \t")
        if not dropping:
            kept.append(line)
    flag = b"YES" if verdict.flagged else b"NO"
    ours = [
        FLAG_HEADER + b": " + flag + newline,
        SCORE_HEADER + b": " + f"{verdict.score:.4f}".encode() + newline,
    ]
    separator = [] if headers else [newline]  # a message without headers gets a header block
    return b"".join(envelope + ours + kept + separator + lines)


class MailClassifier:
    """POSTs raw messages to /v1/classify of a service, remote or in this process."""

    def __init__(self, client: httpx.AsyncClient, long_document: str | None) -> None:
        self._client = client
        self._params = {"long_document": long_document} if long_document else {}
        self._flag_labels: list[str] | None = None

    async def _flags(self) -> list[str]:
        if self._flag_labels is None:
            info = await self._call("GET", "/info")
            self._flag_labels = list(info["model"]["flag_labels"])
        return self._flag_labels

    async def _call(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        try:
            response = await self._client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise MailClientError(TEMPFAIL, f"the service cannot be reached: {exc}") from exc
        if response.is_success:
            body: dict[str, Any] = response.json()
            return body
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300]
        status = response.status_code
        temporary = status in (408, 429) or status >= 500
        code = TEMPFAIL if temporary or status in (401, 403, 404) else REFUSED
        raise MailClientError(code, f"{method} {path}: {status} {message}")

    async def classify(self, raw: bytes) -> Verdict:
        """The verdict on one raw RFC 822 message."""
        flags = await self._flags()
        body = await self._call(
            "POST", "/v1/classify", content=raw, params=self._params,
            headers={"content-type": "message/rfc822"},
        )  # fmt: skip
        (result,) = body["results"]
        score = max(result["scores"][label] for label in flags)
        return Verdict(bool(result["flagged"]), float(score), result)


@asynccontextmanager
async def remote(url: str, api_key: str | None, timeout: float) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a running linmod service."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout) as client:
        yield client


@asynccontextmanager
async def local(model_dir: Path, device: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the service app run in this process on `model_dir` (ONNX Runtime, no torch)."""
    from service.app import create_app
    from service.settings import Settings

    settings = Settings(
        model_dir=model_dir, device=device, jobs=False, warmup=False, api_keys=[],
        api_keys_file=None,
    )  # fmt: skip
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://linmod") as client:
            for _ in range(6000):
                if (await client.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.01)
            yield client


def read_messages(path: str | None, each: bool, stdin: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, raw bytes) of one message (a file, or stdin), or each of an mbox or Maildir."""
    if not each:
        if path in (None, "-"):
            yield "-", stdin.read()
        else:
            yield str(path), Path(str(path)).read_bytes()
        return
    if path in (None, "-"):
        raise MailClientError(USAGE, "--each needs the path of an mbox file or a Maildir")
    source = Path(str(path))
    box: mailbox.Mailbox[Any]
    if source.is_dir():
        box = mailbox.Maildir(source, factory=None, create=False)
    elif source.is_file():
        box = mailbox.mbox(source, factory=None, create=False)
    else:
        raise MailClientError(USAGE, f"{source} is neither an mbox file nor a Maildir")
    for n, key in enumerate(sorted(box.keys()) if source.is_dir() else box.keys()):
        yield (str(key) if source.is_dir() else f"#{n + 1}"), box.get_bytes(key)


def _line(name: str, verdict: Verdict, as_json: bool) -> str:
    if as_json:
        return json.dumps({"message": name, "flagged": verdict.flagged, "score": verdict.score,
                           "result": verdict.result})  # fmt: skip
    word = "flagged" if verdict.flagged else "ham"
    label = verdict.result["label"]
    return f"{name}\t{word}\t{label}\t{verdict.score:.4f}"


async def run(args: argparse.Namespace, stdin: BinaryIO, stdout: BinaryIO) -> int:
    """Classify the messages the arguments name; the exit status."""
    if args.model_dir is not None:
        service = local(Path(args.model_dir), args.device)
    else:
        service = remote(args.url, args.api_key, args.timeout)
    status = HAM
    async with service as client:
        classifier = MailClassifier(client, args.long_document)
        for name, raw in read_messages(args.path, args.each, stdin):
            try:
                verdict = await classifier.classify(raw)
            except MailClientError as exc:
                print(f"linmod-mail: {name}: {exc}", file=sys.stderr)
                status = max(status, exc.code)
                if args.header:
                    stdout.write(_framed(raw, args.each))
                continue
            if verdict.flagged:
                status = max(status, FLAGGED)
            if args.header:
                stdout.write(_framed(tag_message(raw, verdict), args.each))
            elif not args.quiet:
                stdout.write((_line(name, verdict, args.json) + "\n").encode())
    if args.header and status in (HAM, FLAGGED):
        return HAM  # a filter that exits non-zero makes procmail or Postfix keep the original
    return status


def _framed(raw: bytes, each: bool) -> bytes:
    if not each:
        return raw
    # One mbox (mboxo) entry: an envelope line, and body lines that look like one quoted.
    body = re.sub(rb"(?m)^From ", b">From ", raw.rstrip(b"\n"))
    return b"From linmod-mail Thu Jan  1 00:00:00 1970\n" + body + b"\n\n"


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    parser = argparse.ArgumentParser(
        prog="linmod-mail",
        description="Classify raw RFC 822 mail with a linmod model. Exit status: 0 ham, 1 "
        "flagged, 2 usage, 3 a message the service refused, 75 the service is unavailable "
        "(mail systems retry). With --header the message is written back tagged and the "
        "status is 0 unless classifying failed.",
    )
    parser.add_argument("path", nargs="?", help="a message file (default: stdin); with --each, "
                        "an mbox file or a Maildir directory")  # fmt: skip
    parser.add_argument("--each", action="store_true", help="classify every message of PATH")
    parser.add_argument(
        "--url",
        default=os.environ.get("LINMOD_URL", "http://127.0.0.1:8000"),
        help="a running service [env LINMOD_URL; default %(default)s]",
    )
    parser.add_argument(
        "--api-key", default=os.environ.get("LINMOD_API_KEY"), help="[env LINMOD_API_KEY]"
    )
    parser.add_argument(
        "--model-dir", help="classify in this process with the model in this directory instead"
    )
    parser.add_argument(
        "--device", choices=["cpu", "auto", "cuda"], default="cpu",
        help="with --model-dir: where the model runs (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--header", action="store_true", help="write the message back with "
                        "X-Linmod-Flag (YES/NO) and X-Linmod-Score headers")  # fmt: skip
    parser.add_argument("--long-document", choices=["chunk", "truncate", "reject"])
    parser.add_argument("--json", action="store_true", help="print each full result as JSON")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="print nothing; exit status only"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of linmod-mail."""
    args = build_parser().parse_args(argv)
    try:
        code = asyncio.run(run(args, sys.stdin.buffer, sys.stdout.buffer))
    except MailClientError as exc:
        print(f"linmod-mail: {exc}", file=sys.stderr)
        code = exc.code
    except OSError as exc:
        print(f"linmod-mail: {exc}", file=sys.stderr)
        code = USAGE
    except Exception as exc:  # an uncaught error exits 1, which a mail filter would read as flagged
        print(f"linmod-mail: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = TEMPFAIL
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
