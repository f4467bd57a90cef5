"""Training: tokenizer on the train split, then length-bucketed masked batches, AdamW, warm-up + cosine.

A run directory holds tokenizer.json, best/ and last/ checkpoints, history.json and run.json.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.batching import collate
from model.bow import bow_logits, cross_fit, fit_bow
from model.checkpoint import load_pretrained, save_checkpoint
from model.config import ModelConfig
from model.data import DataError, read_manifest, read_split
from model.linformer import LinformerClassifier
from model.tokenizer import MASK_ID, PAD_ID
from model.training import (
    consider_average,
    encode_split,
    evaluate_split,
    finish_run,
    load_teacher,
    make_optimizer,
    make_schedule,
    parse_group_values,
    plan_steps,
    run_command,
    run_epoch,
    selection_score,
    setup,
    tokenizer_for,
)
from service.artifact import TOKENIZER_FILE


@dataclass
class TrainConfig:
    epochs: int = 6  # about 7 minutes an epoch on 2 CPU cores at the default sizes
    # The learning-rate schedule spans this many epochs (0: `epochs`); fewer epochs stop early
    # on it, as the first stage of a length curriculum does.
    schedule_epochs: int = 0
    lr: float = 4e-4  # 1e-3 diverged in the second epoch on the SpamAssassin corpus
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    warmup_steps: int = 100
    max_tokens: int = 8192  # padded tokens per micro-batch
    max_batch: int = 64
    # Micro-batches accumulate until a step has seen this many documents: a step on two long
    # documents alone (all a 8,192-token micro-batch holds at n_max) made the loss spike.
    min_docs_per_step: int = 32
    # The checkpoint kept as best: "auc" (validation ROC-AUC, two classes) or "loss". The
    # threshold is chosen on validation afterwards, so ranking is what matters; validation loss
    # also punishes growing confidence, and picked an epoch with a lower AUC.
    select_by: str = "auc"
    # After training, the weights of the last N epochs are averaged; the average is kept as best
    # when its validation score beats every single epoch's. 0 or 1: no averaging.
    average_last: int = 4
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    # Loss weights by the data's `group` field, "group=weight,...": e.g. "hard-ham-1=4" makes
    # each hard-ham message count four times, against flagging legitimate commercial mail.
    group_weights: str = ""
    # Each real token is replaced by <mask> with this probability, afresh every step: the model
    # cannot lean on any one word, which is how a small corpus gets memorised.
    token_dropout: float = 0.0
    # A linmod-pretrain, linmod-convert or linmod-train run directory to start from: its
    # tokenizer, sizes and encoder weights (and with init_head, its classification head too).
    init: str = ""
    init_head: bool = False
    # Documents are cut to their first max_len tokens in training and validation (0: n_max):
    # short first, then long, is how a length curriculum runs within a CPU budget.
    max_len: int = 0
    # Each layer below the top learns at this factor of the one above (1: one learning rate);
    # a pre-trained encoder's lower layers need less change than its upper ones.
    layer_lr_decay: float = 1.0
    seed: int = 1234
    threads: int = 0  # 0: torch's default
    vocab_size: int = 16000
    max_train_docs: int = 0  # 0: all; small values make quick test runs
    # Distillation: a JSON file of a teacher's logits by training document id (linmod-distill
    # writes it). The loss becomes (1 - w) x cross-entropy on the labels + w x T^2 x KL between
    # the teacher's and the student's distributions at temperature T (Hinton et al., 2015).
    teacher: str = ""
    distill_weight: float = 0.5
    distill_temperature: float = 2.0
    # Boosting on a bag of words: with a weight w > 0, every training document's logits get w x
    # the logits of a TF-IDF + logistic-regression branch fitted on the other folds of the
    # training split (validation documents: w x the branch fitted on all of it) before the loss.
    # The encoder then learns what the bag of words gets wrong rather than what it already
    # knows; linmod-bow installs the branch afterwards at this weight.
    bow_offset: float = 0.0
    bow_folds: int = 5
    bow_c: float = 30.0
    # The boosting branch's regression weighs documents by group_weights too (hard ham against
    # false alarms, as in the encoder's loss); linmod-bow then fits the installed branch alike.
    bow_group_weights: bool = False


def train(
    data_dir: Path, out_dir: Path, mc: ModelConfig, tc: TrainConfig, progress: bool = True
) -> dict[str, Any]:
    """Train (from scratch, or from `tc.init`); returns the run summary (also in run.json)."""
    device = setup(tc.seed, tc.threads)
    manifest = read_manifest(data_dir)
    train_ex, val_ex = read_split(data_dir, "train"), read_split(data_dir, "validation")
    if tc.max_train_docs:
        train_ex = random.Random(tc.seed).sample(train_ex, min(tc.max_train_docs, len(train_ex)))
    labels = list(manifest["labels"])  # type: ignore[call-overload]
    weights = parse_group_values(tc.group_weights, "weight")
    unknown_groups = sorted(set(weights) - {e.group for e in train_ex})
    if unknown_groups:
        raise DataError(f"group weights name groups not in the training split: {unknown_groups}")
    out_dir.mkdir(parents=True, exist_ok=True)
    init_state = None
    if tc.init:
        mc, init_state = load_pretrained(Path(tc.init), mc, head=tc.init_head)
    init = Path(tc.init) if tc.init else None
    tok = tokenizer_for(out_dir, (e.text for e in train_ex), tc.vocab_size, init)
    mc = dataclasses.replace(mc, vocab_size=tok.get_vocab_size(), labels=labels, pad_id=PAD_ID)
    if tc.token_dropout and tok.token_to_id("<mask>") != MASK_ID:
        raise DataError(
            f"token dropout needs a <mask> token at id {MASK_ID}; "
            f"{out_dir / TOKENIZER_FILE} has none"
        )
    max_len = min(tc.max_len or mc.n_max, mc.n_max)
    # Encoded once at n_max: the boosting branch reads whole windows, the encoder max_len.
    full_train, y_train = encode_split(tok, train_ex, labels, mc.n_max)
    full_val, y_val = encode_split(tok, val_ex, labels, mc.n_max)
    x_train, x_val = [s[:max_len] for s in full_train], [s[:max_len] for s in full_val]
    w_train = np.array([weights.get(e.group, 1.0) for e in train_ex], dtype=np.float32)
    t_train = load_teacher(Path(tc.teacher), train_ex, labels) if tc.teacher else None
    o_train, o_val = (
        bow_offsets(
            full_train, full_val, y_train, w_train if tc.bow_group_weights else None, mc, tc
        )
        if tc.bow_offset
        else (None, None)
    )

    model = LinformerClassifier(mc).to(device)
    if init_state is not None:
        # Everything but the classification head, whose shape follows the labels and pooling.
        missing, unexpected = model.load_state_dict(init_state, strict=False)
        assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
    opt = make_optimizer(model, tc.lr, tc.weight_decay, tc.layer_lr_decay)
    gen = torch.Generator().manual_seed(tc.seed)
    rng = random.Random(tc.seed)
    lengths = [len(s) for s in x_train]
    steps_per_epoch = len(plan_steps(lengths, tc))
    sched = make_schedule(opt, steps_per_epoch * max(tc.epochs, tc.schedule_epochs), tc)
    print(
        f"model: {model.num_parameters() / 1e6:.2f}M parameters, n_max={mc.n_max}, k={mc.k}, "
        f"sharing={mc.sharing}; {len(x_train)} train / {len(x_val)} validation documents, "
        f"{sum(lengths)} train tokens, {steps_per_epoch} optimizer steps/epoch of at least "
        f"{tc.min_docs_per_step} documents, device {device}",
        file=sys.stderr,
    )

    def step_loss(group: list[list[int]]) -> tuple[float, int]:
        n_docs = sum(len(idx) for idx in group)
        total, seen = 0.0, 0
        for idx in group:
            ids, mask = collate([x_train[i] for i in idx], mc.pad_id)
            if tc.token_dropout:
                dropped = (torch.rand(ids.shape, generator=gen) < tc.token_dropout) & mask.bool()
                ids = torch.where(dropped, MASK_ID, ids)
            target = torch.from_numpy(y_train[idx])
            logits = model(ids.to(device), mask.to(device))
            if o_train is not None:
                logits = logits + torch.from_numpy(o_train[idx]).to(device)
            # Summed over documents and divided by the step's count: every document weighs
            # the same (or its group's weight), whatever micro-batch its length put it in.
            per_doc = F.cross_entropy(
                logits, target.to(device), label_smoothing=tc.label_smoothing, reduction="none"
            )
            if t_train is not None:
                T = tc.distill_temperature
                soft = F.kl_div(
                    F.log_softmax(logits / T, -1),
                    F.log_softmax(torch.from_numpy(t_train[idx]).to(device) / T, -1),
                    reduction="none",
                    log_target=True,
                ).sum(-1)
                per_doc = (1 - tc.distill_weight) * per_doc + tc.distill_weight * T * T * soft
            loss = (per_doc * torch.from_numpy(w_train[idx]).to(device)).sum() / n_docs
            loss.backward()
            total += loss.item()
            seen += int(mask.sum())
        return total, seen

    history: list[dict[str, Any]] = []
    best_score = -float("inf")
    started = time.time()
    step = 0
    for epoch in range(1, tc.epochs + 1):
        done = run_epoch(
            model, opt, sched, plan_steps(lengths, tc, rng), step_loss,
            grad_clip=tc.grad_clip, desc=f"epoch {epoch}/{tc.epochs}", progress=progress,
        )  # fmt: skip
        step += done.steps
        val = evaluate_split(model, x_val, y_val, o_val)
        record = {
            "epoch": epoch,
            "step": step,
            "train_loss_ema": done.loss_ema,
            "train_seconds": done.seconds,
            "tokens_per_second": done.tokens_per_second,
            **{f"val_{k}": v for k, v in val.items()},
        }
        history.append(record)
        print(json.dumps(record), file=sys.stderr)
        state = {"epoch": epoch, "step": step, "val": val, "train_config": dataclasses.asdict(tc)}
        save_checkpoint(model, out_dir / "last", state)
        save_checkpoint(model, out_dir / "epochs" / str(epoch), state)
        score = selection_score(val, tc.select_by)
        if score > best_score:
            best_score = score
            save_checkpoint(model, out_dir / "best", state)
        (out_dir / "history.json").write_text(json.dumps(history, indent=2) + "\n")

    best = consider_average(
        out_dir, history, (x_val, y_val, o_val), tc.select_by, tc.average_last,
        {"train_config": dataclasses.asdict(tc)},
    )  # fmt: skip
    pretraining = None
    for record in ("run.json", "training.json"):  # a run directory, or an exported artifact
        if tc.init and (Path(tc.init) / record).exists():
            pretraining = json.loads((Path(tc.init) / record).read_text())
            break
    distilled_from = None
    if tc.teacher:
        teacher = json.loads(Path(tc.teacher).read_text())
        distilled_from = {k: v for k, v in teacher.items() if k != "logits"}
    summary = {
        "model_config": mc.to_dict(),
        "train_config": dataclasses.asdict(tc),
        "pretraining": pretraining,
        "distilled_from": distilled_from,
        "parameters": model.num_parameters(),
        **best,
        "selected_by": tc.select_by,
        "wall_seconds": round(time.time() - started, 1),
        "train_documents": len(x_train),
        "train_tokens_per_epoch": sum(lengths),
    }
    return finish_run(out_dir, manifest, summary)


def bow_offsets(
    train_ids: list[list[int]],
    val_ids: list[list[int]],
    y_train: np.ndarray,
    w_train: np.ndarray | None,
    mc: ModelConfig,
    tc: TrainConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """tc.bow_offset x the bag of words' logits: out-of-fold on the training split, and from
    the branch fitted on all of it on validation. The branch reads up to n_max tokens, as the
    installed branch does in a window, whatever the curriculum's max_len."""
    n = mc.num_labels
    oof = cross_fit(train_ids, y_train, mc.vocab_size, n, tc.bow_folds, tc.bow_c, tc.seed, w_train)
    val = bow_logits(fit_bow(train_ids, y_train, mc.vocab_size, n, tc.bow_c, w_train), val_ids)
    return tc.bow_offset * oof, tc.bow_offset * val


def main(argv: list[str] | None = None) -> int:
    done = "done in {wall_seconds} s; best epoch {best_epoch}; run in {out}"
    return run_command(argv, "linmod-train", TrainConfig, train, done, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
