"""Out-of-fold scores of the training split, so that the threshold rule can see more of a rare group.

The validation split holds few messages of a rare group (25 hard-ham messages in the SpamAssassin
split), too few to hold a flag rate on: a rule held to 5% of them lets one through, and whether a
model finds those 25 easy says little about the next 49. `linmod-folds split` cuts the training
split into K folds, stratified by group; each fold's directory trains on the other K - 1 folds,
keeps the validation split (so every rule that looks at validation during training still can) and
holds its own fold out as `test`. Train each fold with the model's whole recipe, then
`linmod-folds score` writes the held-out documents' flag scores, which `linmod-eval
--held-out-scores` adds to validation when it holds the group rates (F1 stays validation's).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from model.batching import predict_logits
from model.checkpoint import CheckpointError, load_checkpoint
from model.data import DataError, Example, read_manifest, read_split
from model.tokenizer import encode, load_tokenizer
from service.artifact import TOKENIZER_FILE, flag_scores, softmax

FOLD_PREFIX = "fold-"


def fold_of(examples: list[Example], folds: int, seed: str = "") -> dict[str, int]:
    """{id: fold}: within each group, documents ordered by a hash of their id dealt round-robin,
    so every fold holds each group's share and the assignment does not depend on file order."""
    if folds < 2:
        raise DataError(f"--folds must be at least 2, not {folds}")
    by_group: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        by_group[e.group].append(e)
    out: dict[str, int] = {}
    for group in sorted(by_group):
        ranked = sorted(
            by_group[group], key=lambda e: hashlib.sha256(f"{seed}fold:{e.id}".encode()).digest()
        )
        for i, e in enumerate(ranked):
            out[e.id] = i % folds
    return out


def write_folds(data: Path, out: Path, folds: int, seed: str = "") -> list[Path]:
    """Write `out/fold-k/` for k < folds; the directories written."""
    train = read_split(data, "train")
    if len({e.id for e in train}) != len(train):
        raise DataError(f"{data}/train.jsonl has repeated ids; folds need unique ones")
    manifest = read_manifest(data)
    fold = fold_of(train, folds, seed)
    dirs = []
    for k in range(folds):
        d = out / f"{FOLD_PREFIX}{k}"
        d.mkdir(parents=True, exist_ok=True)
        for split, keep in (("train", lambda e, k=k: fold[e.id] != k), ("test", None)):
            rows = [e for e in train if (keep(e) if keep else fold[e.id] == k)]
            with (d / f"{split}.jsonl").open("w", encoding="utf-8") as f:
                for e in rows:
                    f.write(json.dumps(e.__dict__, ensure_ascii=False) + "\n")
        shutil.copyfile(data / "validation.jsonl", d / "validation.jsonl")
        info = {"fold": k, "folds": folds, "of": str(data), "held_out": "test"}
        (d / "manifest.json").write_text(json.dumps({**manifest, "crossfit": info}, indent=2))
        dirs.append(d)
    return dirs


def score_fold(run: Path, fold_dir: Path, flag_labels: list[str] | None = None) -> dict[str, Any]:
    """Flag scores of a fold's held-out documents by the run trained on the rest (its best/,
    each document's first n_max tokens, as validation is scored)."""
    manifest = read_manifest(fold_dir)
    if "crossfit" not in manifest:
        raise DataError(f"{fold_dir} was not written by `linmod-folds split`")
    model = load_checkpoint(run / "best")
    labels = list(model.cfg.labels)
    flag_labels = flag_labels or (["spam"] if "spam" in labels else labels[1:])
    tok = load_tokenizer(run / TOKENIZER_FILE)
    held = read_split(fold_dir, "test")
    ids = [x[: model.cfg.n_max] for x in encode(tok, [e.text for e in held])]
    scores = flag_scores(softmax(predict_logits(model, ids, progress=True)), labels, flag_labels)
    return {
        "crossfit": manifest["crossfit"],
        "run": str(run),
        "flag_labels": flag_labels,
        "scores": [
            {"id": e.id, "group": e.group, "score": round(float(s), 7)}
            for e, s in zip(held, scores, strict=True)
        ],
    }


def read_held_out(paths: list[Path], train: list[Example]) -> list[list[dict[str, Any]]]:
    """The score lists of `linmod-folds score` files, one per fold, checked against the training
    split: every id a training document's, no document in two folds, every fold of one set."""
    known = {e.id for e in train}
    seen: set[str] = set()
    folds: set[int] = set()
    out = []
    for path in paths:
        try:
            record = json.loads(path.read_text())
            rows, info = record["scores"], record["crossfit"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path} is not a `linmod-folds score` file: {e}") from e
        ids = [r["id"] for r in rows]
        stray = [i for i in ids if i not in known]
        if stray:
            raise DataError(
                f"{path}: {len(stray)} ids are not in the training split, e.g. {stray[0]}"
            )
        twice = seen.intersection(ids)
        if twice:
            raise DataError(f"{path}: {len(twice)} documents are in another fold's scores too")
        if info["fold"] in folds:
            raise DataError(f"{path}: fold {info['fold']} is given twice")
        seen.update(ids)
        folds.add(info["fold"])
        out.append(rows)
    return out


def held_arrays(folds: list[list[dict[str, Any]]]) -> tuple[np.ndarray, np.ndarray]:
    rows = [r for f in folds for r in f]
    return np.array([r["score"] for r in rows], dtype=float), np.array([r["group"] for r in rows])


def held_out_words(folds: list[list[dict[str, Any]]]) -> str | None:
    """How the threshold rule names the out-of-fold scores, or None without them."""
    if not folds:
        return None
    return f"the training split's out-of-fold scores ({len(folds)} folds)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="linmod-folds", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("split", help="write fold directories of the training split")
    sp.add_argument("--data", type=Path, required=True, help="dataset directory (linmod-data)")
    sp.add_argument("--out", type=Path, required=True, help="where fold-0/, fold-1/... go")
    sp.add_argument("--folds", type=int, default=3)
    sc = sub.add_parser("score", help="flag scores of a fold's held-out documents")
    sc.add_argument("--run", type=Path, required=True, help="the run trained on that fold")
    sc.add_argument("--data", type=Path, required=True, help="the fold's directory")
    sc.add_argument("--out", type=Path, required=True, help="JSON file to write")
    sc.add_argument("--flag-labels", nargs="+", help="labels that count as flagged")
    args = p.parse_args(argv)
    try:
        if args.command == "split":
            for d in write_folds(args.data, args.out, args.folds):
                counts = sum(1 for _ in (d / "test.jsonl").open())
                print(f"wrote {d} ({counts} held out)")
        else:
            record = score_fold(args.run, args.data, args.flag_labels)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record) + "\n")
            print(f"wrote {len(record['scores'])} held-out scores to {args.out}")
    except (DataError, CheckpointError, FileNotFoundError) as e:
        print(f"linmod-folds: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
