"""Evaluation on the test split, the decision threshold (validation only), a TF-IDF baseline, and
shipping the result as an artifact directory (config, tokenizer, checkpoint, metrics, model card).
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

from model.batching import predict_logits
from model.card import write_card
from model.checkpoint import CONFIG, CheckpointError, code_version, load_checkpoint
from model.crossfit import held_arrays, held_out_words, read_held_out
from model.data import DataError, Example, read_manifest, read_split
from model.machine import machine_info
from model.metrics import (
    binary_report,
    bootstrap_f1_difference,
    choose_threshold,
    multiclass_report,
    threshold_rule,
)
from model.sa_baseline import CACHE_DIR as SA_CACHE_DIR
from model.sa_baseline import SpamAssassinError, spamassassin_baseline
from model.sa_baseline import summary as sa_summary
from model.tokenizer import encode, load_tokenizer
from model.training import parse_group_values
from service import artifact
from service.artifact import (
    METRICS_FILE,
    MODEL_KEYS,
    TOKENIZER_FILE,
    TRAINING_FILE,
    ArtifactConfig,
    flag_scores,
    softmax,
)
from service.documents import window_starts


def windows(ids: list[int], n_max: int, overlap: int) -> list[list[int]]:
    """The windows the service classifies for a long document (its own rule, reused)."""
    if not 0 <= overlap < n_max:
        raise ValueError(f"overlap must be in [0, n_max={n_max}), not {overlap}")
    return [ids[s : s + n_max] for s in window_starts(len(ids), n_max, overlap)]


def baseline_scores(
    train: list[Example], others: list[list[Example]], flag_labels: list[str]
) -> list[np.ndarray]:
    """TF-IDF (word 1-2 grams) + logistic regression, fitted on train; flag-class scores."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    pipe = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=200_000, sublinear_tf=True),
        LogisticRegression(C=10.0, max_iter=2000),
    )
    pipe.fit([e.text for e in train], [e.label in flag_labels for e in train])
    return [pipe.predict_proba([e.text for e in exs])[:, 1] for exs in others]


def baseline_held_out(
    train: list[Example],
    folds: list[list[dict[str, Any]]],
    capped: list[Example],
    flag_labels: list[str],
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """TF-IDF's out-of-fold scores over the same folds as the model's, for the documents of the
    groups the rule holds (only those count there): each fold's fitted on the other folds."""
    if not folds:
        return None, None
    wanted = {e.id for e in capped}
    by_id = {e.id: e for e in train}
    s_out: list[float] = []
    g_out: list[str] = []
    for rows in folds:
        held_ids = {r["id"] for r in rows}
        held = [by_id[r["id"]] for r in rows if r["id"] in wanted]
        if not held:
            continue
        (s,) = baseline_scores([e for e in train if e.id not in held_ids], [held], flag_labels)
        s_out.extend(float(x) for x in s)
        g_out.extend(e.group for e in held)
    return np.array(s_out), np.array(g_out)


def held_out_summary(
    folds: list[list[dict[str, Any]]], paths: list[Path], held_groups: dict[str, float]
) -> dict[str, Any] | None:
    """What metrics.json records of the out-of-fold scores: folds, files, and how many
    documents of each held group they add to validation's."""
    if not folds:
        return None
    by_group = {g: 0 for g in held_groups}
    for r in (r for f in folds for r in f):
        if r["group"] in by_group:
            by_group[r["group"]] += 1
    return {"folds": len(folds), "files": [str(p) for p in paths], "documents": by_group}


def median_latency_ms(
    model: torch.nn.Module, seqs: list[list[int]], repeats: int = 20
) -> dict[str, float]:
    doc = sorted(seqs, key=len)[len(seqs) // 2]
    ids = torch.tensor([doc])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        model(ids, mask)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(ids, mask)
    ms = 1000 * (time.perf_counter() - t0) / repeats
    mi = machine_info()
    machine = f"{mi['cpu']}, {torch.get_num_threads()} threads"
    return {"tokens": len(doc), "ms": ms, "machine": machine}


def evaluate(
    run_dir: Path,
    data_dir: Path,
    artifact_dir: Path,
    name: str,
    flag_labels: list[str] | None = None,
    chunk_overlap: int = 256,
    max_group_rate: dict[str, float] | None = None,
    spamassassin: bool = False,
    sa_cache_dir: Path | None = None,
    held_out: list[Path] | None = None,
) -> dict[str, Any]:
    ckpt = run_dir / "best"
    model = load_checkpoint(ckpt)
    cfg = model.cfg
    tok = load_tokenizer(run_dir / TOKENIZER_FILE)
    labels = cfg.labels
    manifest = read_manifest(data_dir)
    if list(manifest["labels"]) != labels:  # type: ignore[call-overload]
        raise DataError(f"data labels {manifest['labels']} differ from the model's {labels}")
    if flag_labels is None:
        flag_labels = ["spam"] if "spam" in labels else labels[1:]
    unknown = sorted(set(flag_labels) - set(labels))
    if unknown:
        raise DataError(f"flag labels {unknown} are not model labels {labels}")

    splits = {s: read_split(data_dir, s) for s in ("train", "validation", "test")}
    full_ids = {s: encode(tok, [e.text for e in splits[s]]) for s in ("validation", "test")}
    probs = {
        s: softmax(predict_logits(model, [x[: cfg.n_max] for x in full_ids[s]], progress=True))
        for s in full_ids
    }
    truth = {s: np.array([e.label in flag_labels for e in splits[s]]) for s in full_ids}
    scores = {s: flag_scores(probs[s], labels, flag_labels) for s in full_ids}
    val_groups = np.array([e.group for e in splits["validation"]])
    # Out-of-fold scores of training documents (linmod-folds) join validation's in holding the
    # group rates; each baseline gets its own over the same folds.
    folds = read_held_out(held_out, splits["train"]) if held_out else []
    if folds and not max_group_rate:
        raise ValueError("--held-out-scores only serve --max-flag-rate; give both or neither")
    held_s, held_g = held_arrays(folds) if folds else (None, None)
    threshold = choose_threshold(
        scores["validation"], truth["validation"], val_groups, max_group_rate, held_s, held_g
    )
    groups = [e.group for e in splits["test"]]
    report = binary_report(scores["test"], truth["test"], threshold, groups)

    # The service's default long-document policy: overlapping windows, max of the flag score.
    chunk_overlap = min(chunk_overlap, cfg.n_max // 4)
    test_windows = [windows(x, cfg.n_max, chunk_overlap) for x in full_ids["test"]]
    flat = [w for ws in test_windows for w in ws]
    wscores = flag_scores(softmax(predict_logits(model, flat)), labels, flag_labels)
    chunked, i = [], 0
    for ws in test_windows:
        chunked.append(wscores[i : i + len(ws)].max())
        i += len(ws)
    long_docs = int(sum(len(ws) > 1 for ws in test_windows))
    chunk_report = binary_report(np.array(chunked), truth["test"], threshold, groups)

    b_val, b_test = baseline_scores(
        splits["train"], [splits["validation"], splits["test"]], flag_labels
    )
    capped = [e for e in splits["train"] if e.group in (max_group_rate or {})]
    b_held_s, b_held_g = baseline_held_out(splits["train"], folds, capped, flag_labels)
    b_threshold = choose_threshold(
        b_val, truth["validation"], val_groups, max_group_rate, b_held_s, b_held_g
    )
    baseline = binary_report(b_test, truth["test"], b_threshold, groups)
    sa_baseline: dict[str, Any] = {"skipped": "not run (--no-spamassassin)"}
    if spamassassin:
        try:
            sa_baseline = spamassassin_baseline(
                splits, flag_labels, max_group_rate, sa_cache_dir, held_out=folds
            )
        except SpamAssassinError as e:
            sa_baseline = {"skipped": f"SpamAssassin failed: {e}"}

    y_test = np.array([labels.index(e.label) for e in splits["test"]])
    metrics: dict[str, Any] = {
        "split": "test",
        "flag_labels": flag_labels,
        "threshold_rule": threshold_rule(max_group_rate, held_out_words(folds)),
        "held_out_for_threshold": held_out_summary(folds, held_out or [], max_group_rate or {}),
        "model": report,
        "model_chunked": {
            **chunk_report,
            "documents_longer_than_n_max": long_docs,
            "chunk_overlap": chunk_overlap,
            "aggregation": "max",
        },
        "baseline_tfidf_logreg": baseline,
        "f1_difference_vs_tfidf": bootstrap_f1_difference(
            scores["test"], threshold, b_test, b_threshold, truth["test"]
        ),
        "baseline_spamassassin": sa_baseline,
        "multiclass": multiclass_report(probs["test"], y_test, labels),
        "validation": binary_report(
            scores["validation"], truth["validation"], threshold, list(val_groups)
        ),
        "pytorch_cpu_latency_median_doc": median_latency_ms(
            model, [x[: cfg.n_max] for x in full_ids["test"]]
        ),
    }
    ship(run_dir, artifact_dir, name, flag_labels, threshold, manifest, metrics)
    return metrics


def ship(
    run_dir: Path,
    artifact_dir: Path,
    name: str,
    flag_labels: list[str],
    threshold: float,
    manifest: dict[str, Any],
    metrics: dict[str, Any],
) -> None:
    """Write the artifact: checkpoint, tokenizer, service config, metrics, training record, card."""
    ckpt = run_dir / "best"
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    if (run_dir / "history.json").exists():
        run["history"] = json.loads((run_dir / "history.json").read_text())
    mc = json.loads((ckpt / CONFIG).read_text())
    config = ArtifactConfig(
        name=name,
        version=time.strftime("%Y.%m.%d"),
        architecture="linformer",
        labels=mc["labels"],
        flag_labels=flag_labels,
        threshold=round(threshold, 6),
        threshold_rule=metrics["threshold_rule"],
        **{k: mc[k] for k in MODEL_KEYS},
        data={"source": manifest.get("source"), "sha256": manifest.get("sha256")},
        code_version=run.get("code_version") or code_version(),
    )
    artifact.ship(ckpt, run_dir / TOKENIZER_FILE, artifact_dir, config)
    (artifact_dir / TRAINING_FILE).write_text(json.dumps(run, indent=2) + "\n")
    (artifact_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    write_card(artifact_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="linmod-eval", description=__doc__)
    p.add_argument("--run", type=Path, required=True, help="training run directory")
    p.add_argument("--data", type=Path, required=True, help="dataset directory (linmod-data)")
    p.add_argument("--artifact", type=Path, required=True, help="artifact directory to write")
    p.add_argument("--name", help="model name (default: the artifact directory's name)")
    p.add_argument("--flag-labels", nargs="+", help="labels that count as flagged")
    p.add_argument("--chunk-overlap", type=int, default=256)
    p.add_argument(
        "--max-flag-rate",
        default="",
        metavar="GROUP=RATE,...",
        help="hold the threshold to flag at most this share of a validation group, "
        "e.g. hard-ham-1=0.05 (legitimate commercial mail)",
    )
    p.add_argument(
        "--held-out-scores",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="out-of-fold scores of the training split (`linmod-folds score`, one file per "
        "fold) that join validation in holding --max-flag-rate; the baselines get theirs over "
        "the same folds",
    )
    p.add_argument(
        "--no-spamassassin",
        action="store_true",
        help="skip the SpamAssassin baseline (run where spamassassin is installed)",
    )
    p.add_argument(
        "--sa-cache-dir",
        type=Path,
        default=SA_CACHE_DIR,
        help="where SpamAssassin's scores are kept, keyed by the data's sha256",
    )
    args = p.parse_args(argv)
    try:
        max_group_rate = parse_group_values(args.max_flag_rate, "rate")
        m = evaluate(
            args.run,
            args.data,
            args.artifact,
            args.name or args.artifact.name,
            args.flag_labels,
            args.chunk_overlap,
            max_group_rate,
            spamassassin=not args.no_spamassassin,
            sa_cache_dir=args.sa_cache_dir,
            held_out=args.held_out_scores,
        )
    except (DataError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"linmod-eval: error: {e}", file=sys.stderr)
        return 2
    for key in ("model", "model_chunked", "baseline_tfidf_logreg"):
        r = m[key]
        hard = r["flag_rate_by_group"].get("hard-ham-1", {}).get("rate")
        print(
            f"{key:>22}: F1 {r['f1']:.4f}  precision {r['precision']:.4f}  recall {r['recall']:.4f}  "
            f"AUC {r['roc_auc']:.4f}  threshold {r['threshold']:.3f}"
            + (f"  hard-ham FPR {hard:.3f}" if hard is not None else "")
        )
    print(sa_summary(m["baseline_spamassassin"]))
    print(f"wrote {args.artifact}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
