"""Classification metrics and the validation-only threshold rule."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np


def choose_threshold(
    scores: np.ndarray,
    flagged: np.ndarray,
    groups: np.ndarray | None = None,
    max_group_rate: dict[str, float] | None = None,
    held_scores: np.ndarray | None = None,
    held_groups: np.ndarray | None = None,
) -> float:
    """The threshold maximising F1 of `flagged` on these scores; the median of ties.

    Candidates are the midpoints between consecutive distinct scores, so the choice does not
    sit on any one example's score. With `max_group_rate` ({group: rate}), only thresholds that
    flag at most that share of each named group (in `groups`) are candidates; flagging nothing
    always qualifies, so there is always an answer. `held_scores` and `held_groups` (out-of-fold
    scores of training documents, say) join the validation examples in that hold, and only there:
    F1 stays the validation split's. Their scores in held groups add candidates, so that the
    threshold can sit just above one of them.
    """
    s = scores
    if held_scores is not None and held_groups is not None and len(held_scores):
        if groups is None:
            raise ValueError("held-out scores need the validation groups beside them")
        pooled_s = np.concatenate([scores, held_scores])
        pooled_g = np.concatenate([groups, held_groups])
        in_held = np.isin(held_groups, list(max_group_rate or {}))
        s = np.concatenate([scores, held_scores[in_held]])
    else:
        pooled_s, pooled_g = scores, groups
    s = np.unique(s)
    cands = (
        np.concatenate([[s[0] / 2], (s[:-1] + s[1:]) / 2, [(s[-1] + 1) / 2]])
        if len(s)
        else np.array([0.5])
    )
    limits = []
    for name, rate in (max_group_rate or {}).items():
        if groups is None or not (groups == name).any():
            raise ValueError(f"no validation examples in group {name!r} to hold to a flag rate")
        limits.append((pooled_s[pooled_g == name], rate))
    pos = flagged.astype(bool)
    best, ties = -1.0, []
    for t in cands:
        pred = scores >= t
        if any((member >= t).mean() > rate + 1e-12 for member, rate in limits):
            continue
        tp = int((pred & pos).sum())
        fp = int((pred & ~pos).sum())
        fn = int((~pred & pos).sum())
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        if f1 > best + 1e-12:
            best, ties = f1, [t]
        elif abs(f1 - best) <= 1e-12:
            ties.append(t)
    return float(np.median(ties))


def threshold_rule(
    max_group_rate: dict[str, float] | None = None, held_out: str | None = None
) -> str:
    """The threshold rule in words, as the model card and config.json state it; `held_out` names
    the out-of-fold scores that join validation in holding the group rates."""
    rule = "the threshold that maximises F1 of the flag decision on the validation split"
    if max_group_rate:
        held = ", ".join(f"{rate:.0%} of {name}" for name, rate in max_group_rate.items())
        where = f"there and in {held_out} taken together" if held_out else "there"
        rule += f", among thresholds that flag at most {held} {where}"
    among = "validation scores"
    if max_group_rate and held_out:
        among = "scores of validation and of those held-out documents of the held groups"
    return rule + f" (candidates: midpoints between consecutive {among}; the median of ties)"


def expected_calibration_error(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE over equal-width confidence bins."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        sel = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def binary_report(
    scores: np.ndarray, positive: np.ndarray, threshold: float, groups: list[str] | None = None
) -> dict[str, Any]:
    """Metrics for flagging by `scores >= threshold` against the boolean truth `positive`."""
    from sklearn.metrics import roc_auc_score

    pos = positive.astype(bool)
    pred = scores >= threshold
    tp, fp = int((pred & pos).sum()), int((pred & ~pos).sum())
    fn, tn = int((~pred & pos).sum()), int((~pred & ~pos).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    # Calibration of the binary probability: confidence in whichever side was predicted.
    conf = np.where(pred, scores, 1 - scores)
    out: dict[str, Any] = {
        "n": len(scores),
        "threshold": threshold,
        "accuracy": (tp + tn) / len(scores),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "roc_auc": float(roc_auc_score(pos, scores)) if 0 < pos.sum() < len(pos) else None,
        "false_positive_rate": fp / (fp + tn) if fp + tn else 0.0,
        "calibration_error": expected_calibration_error(conf, pred == pos),
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }
    if groups is not None:
        g = np.array(groups)
        out["flag_rate_by_group"] = {
            name: {
                "n": int((g == name).sum()),
                "flagged": int(pred[g == name].sum()),
                "rate": float(pred[g == name].mean()),
            }
            for name in sorted(set(groups))
        }
    return out


def multiclass_report(probs: np.ndarray, y: np.ndarray, labels: list[str]) -> dict[str, Any]:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    pred = probs.argmax(-1)
    p, r, f, n = precision_recall_fscore_support(
        y, pred, labels=range(len(labels)), zero_division=0
    )
    return {
        "accuracy": float((pred == y).mean()),
        "f1_macro": float(np.mean(f)),
        "per_label": {
            lab: {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "n": int(n[i]),
            }
            for i, lab in enumerate(labels)
        },
        "calibration_error": expected_calibration_error(probs.max(-1), pred == y),
        "confusion_matrix": confusion_matrix(y, pred, labels=range(len(labels))).tolist(),
    }


def _f1(pred: np.ndarray, truth: np.ndarray) -> float:
    tp = float((pred & truth).sum())
    denom = float(pred.sum() + truth.sum())
    return 2 * tp / denom if denom else 0.0


def bootstrap_f1_difference(
    scores_a: np.ndarray,
    threshold_a: float,
    scores_b: np.ndarray,
    threshold_b: float,
    truth: np.ndarray,
    n: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Paired bootstrap over test documents of F1(a) - F1(b), each at its own fixed threshold.

    Returns the observed difference and the 2.5th and 97.5th percentiles of the resampled ones.
    """
    truth = truth.astype(bool)
    pred_a, pred_b = scores_a >= threshold_a, scores_b >= threshold_b
    rng = np.random.default_rng(seed)
    diffs = np.empty(n)
    for i in range(n):
        idx = rng.integers(0, len(truth), len(truth))
        diffs[i] = _f1(pred_a[idx], truth[idx]) - _f1(pred_b[idx], truth[idx])
    return {
        "difference": _f1(pred_a, truth) - _f1(pred_b, truth),
        "ci95_low": float(np.percentile(diffs, 2.5)),
        "ci95_high": float(np.percentile(diffs, 97.5)),
        "share_above_zero": float((diffs > 0).mean()),
        "resamples": n,
    }
