"""A bag-of-words branch for a trained run: TF-IDF + logistic regression on its own token ids,
installed into the checkpoint so that one exported graph carries both signals.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.batching import predict_logits
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.data import DataError, read_split
from model.linformer import BagOfWords, LinformerClassifier
from model.tokenizer import encode, load_tokenizer
from model.training import parse_group_values

# Candidate weights of the bag-of-words logits against the encoder's, chosen on validation.
MIX_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def fit_bow(
    seqs: list[list[int]],
    y: np.ndarray,
    vocab_size: int,
    num_labels: int,
    c: float = 30.0,
    sample_weight: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """idf (V,), weight (V, num_labels), bias (num_labels,) of TF-IDF + logistic regression.

    The same features the model's BagOfWords computes: 1 + log tf, ids seen in fewer than two
    training documents weigh 0, L2-normalised. `sample_weight` weighs documents in the
    regression's loss (a group's weight, as in the encoder's).
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(analyzer=_identity, sublinear_tf=True, min_df=2)
    x = vec.fit_transform(seqs)
    lr = LogisticRegression(C=c, max_iter=5000).fit(x, y, sample_weight=sample_weight)
    idf = torch.zeros(vocab_size)
    weight = torch.zeros(vocab_size, num_labels)
    bias = torch.zeros(num_labels)
    ids = torch.tensor([int(t) for t in vec.get_feature_names_out()])
    idf[ids] = torch.tensor(vec.idf_, dtype=torch.float32)
    coef = torch.tensor(lr.coef_, dtype=torch.float32)  # (1 or num_labels, features)
    if coef.shape[0] == 1:  # binary: the logit of label 1 against label 0
        weight[ids, 1] = coef[0]
        bias[1] = float(lr.intercept_[0])
    else:
        weight[ids] = coef.T
        bias[:] = torch.tensor(lr.intercept_, dtype=torch.float32)
    return {"bow.idf": idf, "bow.weight": weight, "bow.bias": bias}


def bow_logits(state: dict[str, torch.Tensor], seqs: list[list[int]]) -> np.ndarray:
    """The branch's logits (N, labels) for token sequences, as the model computes them."""
    vocab, labels = state["bow.weight"].shape
    branch = BagOfWords(ModelConfig(vocab_size=vocab, labels=[str(i) for i in range(labels)]))
    branch.load_state_dict({k.removeprefix("bow."): v for k, v in state.items()})
    with torch.no_grad():
        return np.concatenate(
            [branch(*_padded(seqs[i : i + 64])).numpy() for i in range(0, len(seqs), 64)]
        )


def cross_fit(
    seqs: list[list[int]],
    y: np.ndarray,
    vocab_size: int,
    num_labels: int,
    folds: int,
    c: float = 30.0,
    seed: int = 0,
    sample_weight: np.ndarray | None = None,
) -> np.ndarray:
    """Out-of-fold logits (N, num_labels): each document scored by a branch fitted without it,
    as the branch fitted on the whole training split will score documents it has never seen."""
    fold = np.random.default_rng(seed).permutation(len(seqs)) % folds
    out = np.zeros((len(seqs), num_labels), dtype=np.float32)
    for f in range(folds):
        fit, held = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        w = None if sample_weight is None else sample_weight[fit]
        state = fit_bow([seqs[i] for i in fit], y[fit], vocab_size, num_labels, c, w)
        out[held] = bow_logits(state, [seqs[i] for i in held])
    return out


def _identity(seq: list[int]) -> list[int]:
    return seq


def with_bow(
    model: LinformerClassifier, state: dict[str, torch.Tensor], mix: float
) -> LinformerClassifier:
    """A copy of `model` with the bag-of-words branch, its logits scaled by `mix`."""
    out = LinformerClassifier(dataclasses.replace(model.cfg, bow=True))
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("bow.")}
    weights.update(
        {
            "bow.idf": state["bow.idf"],
            "bow.weight": state["bow.weight"] * mix,
            "bow.bias": state["bow.bias"] * mix,
        }
    )
    out.load_state_dict(weights)
    return out.eval()


def log_loss(logits: np.ndarray, y: np.ndarray) -> float:
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def boosted_with(run_dir: Path) -> tuple[float, float, str] | None:
    """(weight, C, group weights) of the bag of words the run's encoder was boosted on, if it
    was; the group weights are the run's own when it fitted the branch with them, else ""."""
    path = run_dir / "run.json"
    tc = json.loads(path.read_text()).get("train_config", {}) if path.exists() else {}
    if not tc.get("bow_offset"):
        return None
    groups = tc.get("group_weights", "") if tc.get("bow_group_weights") else ""
    return float(tc["bow_offset"]), float(tc.get("bow_c", 30.0)), groups


def add_bow(
    run_dir: Path,
    data_dir: Path,
    c: float | None = None,
    mix: float | None = None,
    group_weights: str | None = None,
) -> dict[str, Any]:
    """Fit the branch on the run's training split, weigh it, rewrite best/.

    The weight is `mix` if given; for an encoder boosted on a bag of words (linmod-train
    --bow-offset), the weight and C it was trained beside, since the encoder learned to
    complement exactly that branch; otherwise the grid's best on validation log loss. Every
    weight of the grid is scored on validation and recorded either way. `group_weights`
    ("group=weight,...") weighs training documents in the regression; by default a boosted
    run's, when it fitted its branch with them.
    """
    from sklearn.metrics import roc_auc_score

    boosted = boosted_with(run_dir)
    if c is None:
        c = boosted[1] if boosted else 30.0
    if mix is None and boosted:
        mix = boosted[0]
    if group_weights is None:
        group_weights = boosted[2] if boosted else ""
    by_group = parse_group_values(group_weights, "weight")

    best, encoder_only = run_dir / "best", run_dir / "best-encoder"
    if not encoder_only.exists():
        shutil.copytree(best, encoder_only)
    model = load_checkpoint(encoder_only)
    if model.cfg.bow:
        raise CheckpointError(f"{encoder_only} already has a bag-of-words branch")
    tok = load_tokenizer(run_dir / "tokenizer.json")
    labels, n_max = model.cfg.labels, model.cfg.n_max
    seqs, ys = {}, {}
    for split in ("train", "validation"):
        exs = read_split(data_dir, split)
        seqs[split] = [s[:n_max] for s in encode(tok, [e.text for e in exs])]
        ys[split] = np.array([labels.index(e.label) for e in exs])
    train_groups = [e.group for e in read_split(data_dir, "train")]
    unknown = sorted(set(by_group) - set(train_groups))
    if unknown:
        raise DataError(f"group weights name groups not in the training split: {unknown}")
    sw = np.array([by_group.get(g, 1.0) for g in train_groups]) if by_group else None
    state = fit_bow(seqs["train"], ys["train"], model.cfg.vocab_size, len(labels), c, sw)
    enc = predict_logits(model, seqs["validation"], progress=True)
    bow = bow_logits(state, seqs["validation"])
    y = ys["validation"]
    trials = []
    for w in MIX_GRID:
        z = enc + w * bow
        auc = float(roc_auc_score(y, z[:, 1] - z[:, 0])) if len(labels) == 2 else float("nan")
        trials.append({"mix": w, "val_log_loss": log_loss(z, y), "val_auc": auc})
    by_loss = min(trials, key=lambda t: t["val_log_loss"])
    if mix is None:
        chosen, rule = by_loss, "validation log loss"
    else:
        z = enc + mix * bow
        auc = float(roc_auc_score(y, z[:, 1] - z[:, 0])) if len(labels) == 2 else float("nan")
        chosen = {"mix": mix, "val_log_loss": log_loss(z, y), "val_auc": auc}
        rule = "the boosting weight" if boosted and mix == boosted[0] else "given"
    save_checkpoint(with_bow(model, state, chosen["mix"]), best)
    record = {
        "C": c,
        "group_weights": group_weights,
        "rule": rule,
        "by_validation_log_loss": by_loss,
        "features": int((state["bow.idf"] > 0).sum()),
        "trials": trials,
        "chosen": chosen,
    }
    summary_path = run_dir / "run.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["bag_of_words"] = record
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return record


def _padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    from model.batching import collate

    ids, mask = collate(seqs)
    return ids, mask.bool()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="linmod-bow", description=__doc__)
    p.add_argument("--run", type=Path, required=True, help="training run directory")
    p.add_argument("--data", type=Path, required=True, help="dataset directory (linmod-data)")
    p.add_argument(
        "--C",
        type=float,
        help="inverse L2 strength of the regression (default: a boosted run's, else 30)",
    )
    p.add_argument(
        "--mix",
        type=float,
        help="the branch's weight (default: a boosted run's weight, else the best on validation)",
    )
    p.add_argument(
        "--group-weights",
        metavar="GROUP=WEIGHT,...",
        help="weigh training documents by group in the regression (default: a boosted run's)",
    )
    args = p.parse_args(argv)
    try:
        record = add_bow(args.run, args.data, args.C, args.mix, args.group_weights)
    except (DataError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"linmod-bow: error: {e}", file=sys.stderr)
        return 2
    for t in record["trials"]:
        print(
            f"mix {t['mix']:.2f}: validation log loss {t['val_log_loss']:.4f}, AUC {t['val_auc']:.4f}"
        )
    print(f"kept mix {record['chosen']['mix']} ({record['rule']}) in {args.run / 'best'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
