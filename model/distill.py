"""Distillation targets: a fine-tuned teacher's logits over a data split, for `linmod-train --teacher`.

The teacher is a run's encoder checkpoint (best-encoder/ when linmod-bow has added its bag of
words to best/, else best/). Its in-graph bag of words is fitted on the training split itself, so
on those documents it is sure of every answer and would teach the student nothing but the labels;
with --bow-folds N the teacher's bag of words is cross-fitted instead: each training document
gets the logits of a branch fitted on the other folds, scaled by the run's chosen mix, so the
student learns what the whole teacher says of a document it has not seen. Each document is cut
to the teacher's first --max-len tokens, as the teacher was fine-tuned.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.batching import predict_logits, softmax
from model.bow import cross_fit
from model.card_sections import origin
from model.checkpoint import CheckpointError, load_checkpoint
from model.data import DataError, read_split
from model.tokenizer import encode, load_tokenizer


def teacher_checkpoint(run: Path) -> Path:
    for name in ("best-encoder", "best"):
        if (run / name).exists():
            return run / name
    raise CheckpointError(f"{run} has neither best-encoder/ nor best/: not a training run")


def cross_fitted_bow(
    summary: dict[str, Any],
    seqs: list[list[int]],
    y: np.ndarray,
    vocab_size: int,
    num_labels: int,
    folds: int,
    seed: int = 0,
) -> tuple[np.ndarray, float]:
    """Out-of-fold bag-of-words logits (N, labels), scaled by the mix the run's summary (its
    run.json) chose, and the mix."""
    chosen = summary.get("bag_of_words", {}).get("chosen")
    if not chosen:
        raise CheckpointError("the teacher has no bag of words (run linmod-bow first)")
    mix, c = float(chosen["mix"]), float(summary["bag_of_words"].get("C", 30.0))
    return mix * cross_fit(seqs, y, vocab_size, num_labels, folds, c, seed), mix


def teacher_logits(
    run: Path,
    data: Path,
    split: str = "train",
    max_len: int = 512,
    threads: int = 0,
    bow_folds: int = 0,
) -> dict[str, Any]:
    """{"labels", "teacher", "split", "max_len", "logits": {id: [...]}, "seconds"}."""
    if threads:
        torch.set_num_threads(threads)
    ckpt = teacher_checkpoint(run)
    model = load_checkpoint(ckpt)
    tok = load_tokenizer(run / "tokenizer.json")
    examples = read_split(data, split)
    cut = min(max_len or model.cfg.n_max, model.cfg.n_max)
    full = [s[: model.cfg.n_max] for s in encode(tok, [e.text for e in examples])]
    seqs = [s[:cut] or [model.cfg.pad_id] for s in full]
    summary = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
    t0 = time.time()
    logits = predict_logits(model, seqs, max_tokens=8192, max_batch=32, progress=True)
    labels = list(model.cfg.labels)
    y = np.array([labels.index(e.label) for e in examples])
    bow_mix = None
    if bow_folds:
        n = len(labels)
        bow, bow_mix = cross_fitted_bow(summary, full, y, model.cfg.vocab_size, n, bow_folds)
        logits = logits + bow
    agree = float((logits.argmax(-1) == y).mean())
    return {
        "labels": labels,
        "teacher": str(ckpt),
        "split": split,
        "max_len": cut,
        "accuracy": agree,
        "mean_confidence": float(softmax(logits).max(-1).mean()),
        "seconds": round(time.time() - t0, 1),
        "bow_folds": bow_folds,
        "bow_mix": bow_mix,
        "teacher_origin": origin(summary),
        "teacher_best_epoch": summary.get("best_epoch"),
        "logits": {
            e.id: [round(float(v), 5) for v in row] for e, row in zip(examples, logits, strict=True)
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="linmod-distill", description=__doc__)
    p.add_argument("--teacher", type=Path, required=True, help="the teacher's run directory")
    p.add_argument("--data", type=Path, required=True, help="directory written by linmod-data")
    p.add_argument("--out", type=Path, required=True, help="JSON file of logits to write")
    p.add_argument("--split", default="train")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument(
        "--bow-folds",
        type=int,
        default=0,
        help="add the teacher's bag of words, cross-fitted over this many folds (0: encoder only)",
    )
    args = p.parse_args(argv)
    if args.bow_folds == 1 or args.bow_folds < 0:
        p.error("--bow-folds must be 0 or at least 2")
    try:
        record = teacher_logits(
            args.teacher, args.data, args.split, args.max_len, args.threads, args.bow_folds
        )
    except (DataError, CheckpointError, ValueError) as e:
        print(f"linmod-distill: error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record) + "\n")
    print(
        f"wrote {len(record['logits'])} teacher logits to {args.out} "
        f"(agrees with the labels on {record['accuracy']:.1%}, {record['seconds']} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
