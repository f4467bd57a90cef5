"""Training: tokenizer on the train split, then length-bucketed masked batches, AdamW, warm-up + cosine.

A run directory holds tokenizer.json, best/ and last/ checkpoints, history.json and run.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from model.batching import collate, length_batches, predict_logits, softmax
from model.checkpoint import CONFIG, WEIGHTS, average_checkpoints, code_version, save_checkpoint
from model.config import ModelConfig
from model.data import DataError, Example, read_manifest, read_split
from model.linformer import LinformerClassifier
from model.tokenizer import MASK_ID, PAD_ID, encode, load_tokenizer, train_tokenizer


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


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": torch.get_num_threads(),
        "memory_gib": mem,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def parse_group_weights(spec: str) -> dict[str, float]:
    """ "a=2,b=0.5" -> {"a": 2.0, "b": 0.5}; groups not named weigh 1."""
    out: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, sep, value = item.rpartition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or not name or not weight > 0:
            raise ValueError(
                f"group weights must look like 'group=weight,...' with positive weights, "
                f"not {item!r}"
            )
        out[name] = weight
    return out


def load_pretrained(
    init_dir: Path, mc: ModelConfig, head: bool = False
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Sizes and encoder weights of a run to start from; dropout and pooling stay as given."""
    ckpt = init_dir / "last"
    for path in (init_dir / "tokenizer.json", ckpt / CONFIG, ckpt / WEIGHTS):
        if not path.exists():
            raise DataError(f"{init_dir} is not a linmod-pretrain run: {path} does not exist")
    pre = ModelConfig.load(ckpt / CONFIG)
    mc = dataclasses.replace(pre, dropout=mc.dropout, pooling=pre.pooling if head else mc.pooling)
    state = load_file(str(ckpt / WEIGHTS))
    return mc, {k: v for k, v in state.items() if head or not k.startswith("head.")}


def encode_split(
    tok: Any, examples: list[Example], labels: list[str], n_max: int
) -> tuple[list[list[int]], np.ndarray]:
    """Token ids (head kept at n_max: the model sees what the service's `truncate` sends) and labels."""
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({e.label for e in examples} - set(index))
    if unknown:
        raise DataError(f"labels {unknown} are not among the training labels {labels}")
    ids = [s[:n_max] for s in encode(tok, [e.text for e in examples])]
    empty = [e.id for e, s in zip(examples, ids, strict=True) if not s]
    if empty:
        raise DataError(f"{len(empty)} texts tokenize to nothing, e.g. {empty[0]}")
    return ids, np.array([index[e.label] for e in examples], dtype=np.int64)


def optimizer_steps(micro: list[list[int]], min_docs: int) -> list[list[list[int]]]:
    """Consecutive micro-batches grouped until each group holds at least min_docs documents."""
    steps: list[list[list[int]]] = []
    cur: list[list[int]] = []
    docs = 0
    for mb in micro:
        cur.append(mb)
        docs += len(mb)
        if docs >= min_docs:
            steps.append(cur)
            cur, docs = [], 0
    if cur:
        if steps and docs < min_docs // 2:
            steps[-1].extend(cur)  # a small remainder joins the last step
        else:
            steps.append(cur)
    return steps


def consider_average(
    out_dir: Path,
    history: list[dict[str, Any]],
    x_val: list[list[int]],
    y_val: np.ndarray,
    tc: TrainConfig,
) -> dict[str, Any]:
    """Keep the mean of the last `average_last` epochs' weights as best if it validates better.

    Returns what was kept: {"best_epoch": n} or {"best_epoch": "average of epochs a-b",
    "averaged": {"epochs": [...], "val": {...}}}.
    """

    def score(r: dict[str, Any]) -> float:
        return selection_score(
            {k[4:]: v for k, v in r.items() if k.startswith("val_")}, tc.select_by
        )

    best = max(history, key=score)
    kept: dict[str, Any] = {"best_epoch": best["epoch"]}
    epochs = [r["epoch"] for r in history][-tc.average_last :]
    if tc.average_last < 2 or len(epochs) < 2:
        return kept
    model = average_checkpoints([out_dir / "epochs" / str(e) for e in epochs])
    val = evaluate_split(model, x_val, y_val)
    averaged = {"epochs": epochs, "val": val}
    print(
        json.dumps({"average_of_epochs": epochs, **{f"val_{k}": v for k, v in val.items()}}),
        file=sys.stderr,
    )
    if selection_score(val, tc.select_by) > score(best):
        name = f"average of epochs {epochs[0]}-{epochs[-1]}"
        save_checkpoint(
            model,
            out_dir / "best",
            {"epoch": name, "val": val, "train_config": dataclasses.asdict(tc)},
        )
        kept = {"best_epoch": name}
    return {**kept, "averaged": averaged}


def selection_score(val: dict[str, float], select_by: str) -> float:
    """Higher is better: validation AUC where there is one, else minus the validation loss."""
    if select_by == "auc" and "auc" in val and val["auc"] == val["auc"]:  # not NaN
        return val["auc"]
    return -val["loss"]


class Schedule(Protocol):
    warmup_steps: int
    min_lr_ratio: float


def lr_at(step: int, total: int, tc: Schedule) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio of the peak."""
    if step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, total - tc.warmup_steps))
    return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


_SEQUENCE_PROJECTION = re.compile(r"(.+\.)?proj\.\d+")  # E/F in the model's ParameterList


_BLOCK = re.compile(r"blocks\.(\d+)\.")


def layer_depth(name: str, n_layers: int) -> int:
    """How far below the head a parameter sits: 0 for the head, n_layers + 1 for embeddings."""
    m = _BLOCK.match(name)
    if m:
        return n_layers - int(m.group(1))
    return n_layers + 1 if "emb" in name else 0


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, layer_lr_decay: float = 1.0
) -> torch.optim.Optimizer:
    """AdamW; no decay on biases, norms, embeddings and the sequence projections (nanoGPT's split).

    With layer_lr_decay < 1 each parameter's learning rate is lr x decay^depth (depth 0: head).
    """
    n_layers = len(getattr(model, "blocks", []))
    groups: dict[tuple[bool, int], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        plain = p.dim() >= 2 and "emb" not in name and not _SEQUENCE_PROJECTION.fullmatch(name)
        depth = layer_depth(name, n_layers) if layer_lr_decay != 1.0 else 0
        groups.setdefault((plain, depth), []).append(p)
    params = [
        {
            "params": ps,
            "weight_decay": weight_decay if plain else 0.0,
            "lr": lr * layer_lr_decay**depth,
        }
        for (plain, depth), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))
    ]
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-8)


def evaluate_split(
    model: LinformerClassifier, seqs: list[list[int]], y: np.ndarray
) -> dict[str, float]:
    from sklearn.metrics import f1_score, roc_auc_score

    logits = predict_logits(model, seqs)
    loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y)).item())
    pred = logits.argmax(-1)
    probs = softmax(logits)
    out = {"loss": loss, "accuracy": float((pred == y).mean())}
    if probs.shape[1] == 2:
        out["f1"] = float(f1_score(y, pred))
        out["auc"] = float(roc_auc_score(y, probs[:, 1])) if len(set(y)) == 2 else float("nan")
    else:
        out["f1_macro"] = float(f1_score(y, pred, average="macro"))
    return out


def train(
    data_dir: Path, out_dir: Path, mc: ModelConfig, tc: TrainConfig, progress: bool = True
) -> dict[str, Any]:
    """Train from scratch; returns the run summary (also written to run.json)."""
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    manifest = read_manifest(data_dir)
    train_ex, val_ex = read_split(data_dir, "train"), read_split(data_dir, "validation")
    if tc.max_train_docs:
        train_ex = random.Random(tc.seed).sample(train_ex, min(tc.max_train_docs, len(train_ex)))
    labels = list(manifest["labels"])  # type: ignore[call-overload]
    weights = parse_group_weights(tc.group_weights)
    unknown_groups = sorted(set(weights) - {e.group for e in train_ex})
    if unknown_groups:
        raise DataError(f"group weights name groups not in the training split: {unknown_groups}")
    out_dir.mkdir(parents=True, exist_ok=True)

    tok_path = out_dir / "tokenizer.json"
    init_state = None
    if tc.init:
        mc, init_state = load_pretrained(Path(tc.init), mc, head=tc.init_head)
        shutil.copyfile(Path(tc.init) / "tokenizer.json", tok_path)
    if tok_path.exists():
        tok = load_tokenizer(tok_path)
    else:
        tok = train_tokenizer((e.text for e in train_ex), vocab_size=tc.vocab_size)
        tok.save(str(tok_path))
    mc = dataclasses.replace(mc, vocab_size=tok.get_vocab_size(), labels=labels, pad_id=PAD_ID)
    if tc.token_dropout and tok.token_to_id("<mask>") != MASK_ID:
        raise DataError(f"token dropout needs a <mask> token at id {MASK_ID}; {tok_path} has none")
    max_len = min(tc.max_len or mc.n_max, mc.n_max)
    x_train, y_train = encode_split(tok, train_ex, labels, max_len)
    w_train = np.array([weights.get(e.group, 1.0) for e in train_ex], dtype=np.float32)
    x_val, y_val = encode_split(tok, val_ex, labels, max_len)

    model = LinformerClassifier(mc).to(device)
    if init_state is not None:
        # Everything but the classification head, whose shape follows the labels and pooling.
        missing, unexpected = model.load_state_dict(init_state, strict=False)
        assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
    opt = make_optimizer(model, tc.lr, tc.weight_decay, tc.layer_lr_decay)
    gen = torch.Generator().manual_seed(tc.seed)
    rng = random.Random(tc.seed)
    lengths = [len(s) for s in x_train]
    steps_per_epoch = len(
        optimizer_steps(length_batches(lengths, tc.max_tokens, tc.max_batch), tc.min_docs_per_step)
    )
    total_steps = steps_per_epoch * max(tc.epochs, tc.schedule_epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total_steps, tc))
    print(
        f"model: {model.num_parameters() / 1e6:.2f}M parameters, n_max={mc.n_max}, k={mc.k}, "
        f"sharing={mc.sharing}; {len(x_train)} train / {len(x_val)} validation documents, "
        f"{sum(lengths)} train tokens, {steps_per_epoch} optimizer steps/epoch of at least "
        f"{tc.min_docs_per_step} documents, device {device}",
        file=sys.stderr,
    )
    history: list[dict[str, Any]] = []
    best_score = -float("inf")
    started = time.time()
    step = 0
    for epoch in range(1, tc.epochs + 1):
        model.train()
        t0, seen_tokens, ema = time.time(), 0, None
        micro = length_batches(lengths, tc.max_tokens, tc.max_batch, rng)
        bar = tqdm(
            optimizer_steps(micro, tc.min_docs_per_step),
            desc=f"epoch {epoch}/{tc.epochs}",
            unit="step",
            disable=not progress,
            dynamic_ncols=True,
        )
        for group in bar:
            n_docs = sum(len(idx) for idx in group)
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for idx in group:
                ids, mask = collate([x_train[i] for i in idx], mc.pad_id)
                if tc.token_dropout:
                    dropped = (
                        torch.rand(ids.shape, generator=gen) < tc.token_dropout
                    ) & mask.bool()
                    ids = torch.where(dropped, MASK_ID, ids)
                target = torch.from_numpy(y_train[idx])
                logits = model(ids.to(device), mask.to(device))
                # Summed over documents and divided by the step's count: every document weighs
                # the same (or its group's weight), whatever micro-batch its length put it in.
                per_doc = F.cross_entropy(
                    logits,
                    target.to(device),
                    label_smoothing=tc.label_smoothing,
                    reduction="none",
                )
                loss = (per_doc * torch.from_numpy(w_train[idx]).to(device)).sum() / n_docs
                loss.backward()
                step_loss += loss.item()
                seen_tokens += int(mask.sum())
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            sched.step()
            step += 1
            ema = step_loss if ema is None else 0.9 * ema + 0.1 * step_loss
            bar.set_postfix(
                loss=f"{ema:.4f}",
                tok_s=f"{seen_tokens / (time.time() - t0):.0f}",
                lr=f"{sched.get_last_lr()[0]:.2e}",
            )
        bar.close()
        train_seconds = time.time() - t0
        val = evaluate_split(model, x_val, y_val)
        record = {
            "epoch": epoch,
            "step": step,
            "train_loss_ema": ema,
            "train_seconds": train_seconds,
            "tokens_per_second": seen_tokens / train_seconds,
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

    best = consider_average(out_dir, history, x_val, y_val, tc)
    pretraining = None
    if tc.init and (Path(tc.init) / "run.json").exists():
        pretraining = json.loads((Path(tc.init) / "run.json").read_text())
    summary = {
        "model_config": mc.to_dict(),
        "train_config": dataclasses.asdict(tc),
        "pretraining": pretraining,
        "parameters": model.num_parameters(),
        **best,
        "selected_by": tc.select_by,
        "wall_seconds": round(time.time() - started, 1),
        "train_documents": len(x_train),
        "train_tokens_per_epoch": sum(lengths),
        "data_sha256": manifest.get("sha256"),
        "data_source": manifest.get("source"),
        "code_version": code_version(),
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d"),
    }
    (out_dir / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def add_model_args(p: argparse.ArgumentParser, pooling: bool = True) -> tuple[str, ...]:
    """The model-size options both training commands take; returns the ModelConfig keys set."""
    mdef = ModelConfig()
    sizes = ("n_max", "d_model", "n_layers", "n_heads", "d_ff", "k", "conv_kernel")
    for f in sizes:
        p.add_argument(f"--{f.replace('_', '-')}", type=int, default=getattr(mdef, f))
    p.add_argument("--sharing", choices=["none", "kv", "layerwise"], default=mdef.sharing)
    p.add_argument("--dropout", type=float, default=mdef.dropout)
    if pooling:
        p.add_argument("--pooling", choices=["mean", "mean_max"], default=mdef.pooling)
    return (*sizes, "sharing", "dropout", *(("pooling",) if pooling else ()))


def add_dataclass_args(p: argparse.ArgumentParser, cls: type[Any]) -> None:
    """One --option per field of a config dataclass, typed and defaulted by the field."""
    default = cls()
    for f in dataclasses.fields(cls):
        if isinstance(getattr(default, f.name), bool):
            p.add_argument(
                f"--{f.name.replace('_', '-')}",
                action=argparse.BooleanOptionalAction,
                default=getattr(default, f.name),
            )
            continue
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(getattr(default, f.name)),
            default=getattr(default, f.name),
        )


def dataclass_from_args(cls: type[Any], args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="linmod-train", description=__doc__)
    p.add_argument("--data", type=Path, required=True, help="directory written by linmod-data")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    model_keys = add_model_args(p)
    add_dataclass_args(p, TrainConfig)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        mc = ModelConfig(**{f: getattr(args, f) for f in model_keys})
        tc = dataclass_from_args(TrainConfig, args)
        summary = train(args.data, args.out, mc, tc, progress=not args.no_progress)
    except (DataError, ValueError) as e:
        print(f"linmod-train: error: {e}", file=sys.stderr)
        return 2
    print(
        f"done in {summary['wall_seconds']} s; best epoch {summary['best_epoch']}; run in {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
