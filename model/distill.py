"""Distillation targets: a fine-tuned teacher's logits over a data split, for `linmod-train --teacher`.

The teacher is a run's encoder checkpoint (best-encoder/ when linmod-bow has added its bag of
words to best/, else best/), or a shipped artifact's fp32 ONNX graph (model.onnx), read up to its
encoder's logits, before the in-graph bag of words: a student can be distilled again from a clone,
without the teacher's PyTorch run. Its in-graph bag of words is fitted on the training split itself, so
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
from tqdm import tqdm

from model.batching import predict_logits, softmax
from model.bow import cross_fit
from model.card_sections import origin
from model.checkpoint import CONFIG, CheckpointError, load_checkpoint
from model.config import ModelConfig
from model.data import DataError, read_split
from model.tokenizer import encode, load_tokenizer
from service.artifact import pad_batch


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


def onnx_encoder_logits(
    artifact: Path, seqs: list[list[int]], pad_id: int, threads: int = 0
) -> np.ndarray:
    """Logits (N, labels) of an exported artifact's encoder: its fp32 graph's output before the
    bag-of-words branch is added (the graph's output itself when it has none)."""
    import onnx
    import onnxruntime as ort

    path = artifact / "model.onnx"
    graph = onnx.load(str(path))
    wanted = graph.graph.output[0].name
    producer = {out: node for node in graph.graph.node for out in node.output}
    last = producer.get(wanted)
    if last is not None and last.op_type == "Add":
        # logits = the classification head's + the bag of words': keep the head's.
        heads = [i for i in last.input if i in producer and "head.weight" in producer[i].input]
        if len(heads) != 1:
            raise CheckpointError(f"{path}: cannot tell the encoder's logits from the bag of words")
        wanted = heads[0]
        graph.graph.output.append(onnx.helper.make_empty_tensor_value_info(wanted))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sess = ort.InferenceSession(
        graph.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    order = np.argsort([len(x) for x in seqs], kind="stable")
    parts: dict[int, np.ndarray] = {}
    for start in tqdm(range(0, len(order), 16), desc="teacher", unit="batch"):
        rows = order[start : start + 16]
        ids, mask = pad_batch([seqs[i] for i in rows], pad_id)
        (logits,) = sess.run([wanted], {"input_ids": ids, "attention_mask": mask})
        for r, row in zip(rows, np.asarray(logits, dtype=np.float32), strict=True):
            parts[int(r)] = row
    return np.stack([parts[i] for i in range(len(seqs))])


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
    artifact = (run / "model.onnx").exists() and not (run / "best").exists()
    if artifact:
        ckpt = run / "model.onnx"
        cfg = ModelConfig.load(run / CONFIG)
        record = run / "training.json"
    else:
        ckpt = teacher_checkpoint(run)
        model = load_checkpoint(ckpt)
        cfg = model.cfg
        record = run / "run.json"
    tok = load_tokenizer(run / "tokenizer.json")
    examples = read_split(data, split)
    cut = min(max_len or cfg.n_max, cfg.n_max)
    full = [s[: cfg.n_max] for s in encode(tok, [e.text for e in examples])]
    seqs = [s[:cut] or [cfg.pad_id] for s in full]
    summary = json.loads(record.read_text()) if record.exists() else {}
    t0 = time.time()
    if artifact:
        logits = onnx_encoder_logits(run, seqs, cfg.pad_id, threads)
    else:
        logits = predict_logits(model, seqs, max_tokens=8192, max_batch=32, progress=True)
    labels = list(cfg.labels)
    y = np.array([labels.index(e.label) for e in examples])
    bow_mix = None
    if bow_folds:
        n = len(labels)
        bow, bow_mix = cross_fitted_bow(summary, full, y, cfg.vocab_size, n, bow_folds)
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
    p.add_argument(
        "--teacher",
        type=Path,
        required=True,
        help="the teacher's run directory, or its exported artifact (its fp32 model.onnx)",
    )
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
