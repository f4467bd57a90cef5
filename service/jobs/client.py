"""`linmod-batch`: upload a JSONL file, start a batch, follow it with a progress bar, and download
its output and error files. Any server with the OpenAI Files + Batches API will do.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from service.jobs.jsonl import ENDPOINTS

TERMINAL = ("completed", "failed", "expired", "cancelled")


class BatchClientError(Exception):
    """The server refused a request; the message is its own."""


def _body(response: httpx.Response) -> dict[str, Any]:
    if response.is_error:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300]
        raise BatchClientError(f"{response.request.method} {response.request.url.path}: "
                               f"{response.status_code} {message}")  # fmt: skip
    body: dict[str, Any] = response.json()
    return body


async def upload(client: httpx.AsyncClient, path: Path) -> dict[str, Any]:
    """Upload a JSONL file with purpose batch (read in chunks as it is sent)."""
    with path.open("rb") as file:
        files = {"file": (path.name, file, "application/jsonl")}
        return _body(await client.post("/v1/files", data={"purpose": "batch"}, files=files))


async def create(
    client: httpx.AsyncClient, file_id: str, endpoint: str, metadata: dict[str, str] | None
) -> dict[str, Any]:
    """Start a batch over an uploaded file."""
    body: dict[str, Any] = {"input_file_id": file_id, "endpoint": endpoint}
    body |= {"completion_window": "24h", "metadata": metadata}
    return _body(await client.post("/v1/batches", json=body))


async def follow(
    client: httpx.AsyncClient, batch: dict[str, Any], *, poll_s: float, progress: bool
) -> dict[str, Any]:
    """Poll a batch until it ends, drawing lines done out of lines in the batch."""
    with tqdm(
        total=batch["request_counts"]["total"] or None, unit="line", disable=not progress,
        desc=batch["id"], dynamic_ncols=True,
    ) as bar:  # fmt: skip
        while True:
            counts = batch["request_counts"]
            bar.total = counts["total"] or bar.total
            bar.n = counts["completed"] + counts["failed"]
            bar.set_postfix(status=batch["status"], failed=counts["failed"], refresh=False)
            bar.refresh()
            if batch["status"] in TERMINAL:
                return batch
            await asyncio.sleep(poll_s)
            batch = _body(await client.get(f"/v1/batches/{batch['id']}"))


async def download(client: httpx.AsyncClient, file_id: str, path: Path) -> None:
    """Stream a file's content to disk."""
    async with client.stream("GET", f"/v1/files/{file_id}/content") as response:
        if response.is_error:
            await response.aread()
            _body(response)
        with path.open("wb") as out:
            async for chunk in response.aiter_bytes():
                out.write(chunk)


async def run_batch(
    client: httpx.AsyncClient,
    path: Path,
    *,
    endpoint: str,
    output: Path,
    errors: Path,
    metadata: dict[str, str] | None = None,
    poll_s: float = 1.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Upload, start, follow and download one batch; returns the batch as it ended. If
    interrupted while it runs, the batch is cancelled."""
    file = await upload(client, path)
    batch = await create(client, file["id"], endpoint, metadata)
    try:
        batch = await follow(client, batch, poll_s=poll_s, progress=progress)
    except (asyncio.CancelledError, KeyboardInterrupt):
        print(f"cancelling {batch['id']}", file=sys.stderr)
        await client.post(f"/v1/batches/{batch['id']}/cancel")
        raise
    for key, target in (("output_file_id", output), ("error_file_id", errors)):
        if batch.get(key):
            await download(client, batch[key], target)
    return batch


def build_parser() -> argparse.ArgumentParser:
    """The command line of linmod-batch."""
    parser = argparse.ArgumentParser(
        prog="linmod-batch",
        description="Run a JSONL file of requests as a batch job and download its results.",
    )
    parser.add_argument("input", type=Path, help="JSONL: {custom_id, method, url, body} per line")
    parser.add_argument("--endpoint", choices=ENDPOINTS, default=ENDPOINTS[0],
                        help="the endpoint every line calls [default %(default)s]")  # fmt: skip
    parser.add_argument(
        "--url",
        default=os.environ.get("LINMOD_URL", "http://127.0.0.1:8000"),
        help="the server [env LINMOD_URL; default %(default)s]",
    )
    parser.add_argument(
        "--api-key", default=os.environ.get("LINMOD_API_KEY"), help="[env LINMOD_API_KEY]"
    )
    parser.add_argument("--output", type=Path, help="where the output lines go "
                        "[default INPUT with .output.jsonl]")  # fmt: skip
    parser.add_argument("--errors", type=Path, help="where the error lines go "
                        "[default INPUT with .errors.jsonl]")  # fmt: skip
    parser.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                        help="a metadata pair for the batch (repeatable)")  # fmt: skip
    parser.add_argument("--poll-s", type=float, default=1.0, help="seconds between polls")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run a batch from the command line; exits 0 if it completed, 1 if it ended otherwise,
    2 on bad arguments or a refused request, 130 when interrupted (the batch is cancelled)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.input.is_file():
        parser.error(f"no file {args.input}")
    if any("=" not in pair for pair in args.metadata):
        parser.error("--metadata takes KEY=VALUE")
    metadata = dict(pair.split("=", 1) for pair in args.metadata) or None
    stem = args.input.with_suffix("")
    output = args.output or stem.with_name(stem.name + ".output.jsonl")
    errors = args.errors or stem.with_name(stem.name + ".errors.jsonl")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    async def run() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=300) as client:
            return await run_batch(
                client, args.input, endpoint=args.endpoint, output=output, errors=errors,
                metadata=metadata, poll_s=args.poll_s, progress=not args.no_progress,
            )  # fmt: skip

    try:
        batch = asyncio.run(run())
    except KeyboardInterrupt:
        sys.exit(130)
    except (BatchClientError, httpx.HTTPError) as exc:
        print(f"linmod-batch: {exc}", file=sys.stderr)
        sys.exit(2)
    counts = batch["request_counts"]
    print(f"{batch['id']} {batch['status']}: {counts['completed']} completed, "
          f"{counts['failed']} failed of {counts['total']}")  # fmt: skip
    for key, target in (("output_file_id", output), ("error_file_id", errors)):
        if batch.get(key):
            print(f"{key.split('_')[0]} lines: {target}")
    sys.exit(0 if batch["status"] == "completed" else 1)


if __name__ == "__main__":
    main(sys.argv[1:])
