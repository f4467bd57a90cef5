"""The training scaffold every entry point reuses (linmod-train, linmod-pretrain, fine-tuning):
seeding and device, tokenizer load-or-train, encoded splits, optimizer and schedule, the step loop
with its progress bar, validation, the run's provenance and the command-line helpers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from model.batching import length_batches, predict_logits
from model.checkpoint import average_checkpoints, code_version, save_checkpoint
from model.config import ModelConfig
from model.data import DataError, Example
from model.linformer import LinformerClassifier
from model.machine import machine_info
from model.tokenizer import encode, load_tokenizer, train_tokenizer
from service.artifact import TOKENIZER_FILE, softmax

Steps = list[list[list[int]]]  # optimizer steps, each a list of micro-batches of indices


class LoopConfig(Protocol):
    """What the step loop and the schedule read from an entry point's config dataclass."""

    seed: int
    threads: int
    max_tokens: int
    max_batch: int
    min_docs_per_step: int
    warmup_steps: int
    min_lr_ratio: float
    grad_clip: float


def setup(seed: int, threads: int) -> str:
    """Seed every generator, set torch's threads (0: its default); returns the device."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    return "cuda" if torch.cuda.is_available() else "cpu"


def tokenizer_for(
    out_dir: Path, texts: Iterable[str], vocab_size: int, init: Path | None = None
) -> Any:
    """The run's tokenizer.json: copied from `init`, kept from an earlier run, or trained."""
    path = out_dir / TOKENIZER_FILE
    if init is not None:
        shutil.copyfile(init / TOKENIZER_FILE, path)
    if path.exists():
        return load_tokenizer(path)
    tok = train_tokenizer(texts, vocab_size=vocab_size)
    tok.save(str(path))
    return tok


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


_GROUP_VALUES: dict[str, tuple[str, str, Callable[[float], bool]]] = {
    "weight": ("group weights", "positive weights", lambda v: v > 0),
    "rate": ("flag rates", "rates from 0 to 1", lambda v: 0 <= v <= 1),
}


def parse_group_values(spec: str, kind: str) -> dict[str, float]:
    """ "a=2,b=0.5" -> {"a": 2.0, "b": 0.5}: loss weights (kind "weight", positive) or flag
    rates (kind "rate", 0 to 1) by the data's `group` field; groups not named are left out."""
    what, rule, valid = _GROUP_VALUES[kind]
    out: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, sep, text = item.rpartition("=")
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not sep or not name or not valid(value):
            raise ValueError(f"{what} must look like 'group={kind},...' with {rule}, not {item!r}")
        out[name] = value
    return out


def plan_steps(lengths: Sequence[int], lc: LoopConfig, rng: random.Random | None = None) -> Steps:
    """An epoch's optimizer steps: length-bucketed micro-batches, grouped by documents."""
    micro = length_batches(lengths, lc.max_tokens, lc.max_batch, rng)
    return optimizer_steps(micro, lc.min_docs_per_step)


def optimizer_steps(micro: list[list[int]], min_docs: int) -> Steps:
    """Consecutive micro-batches grouped until each group holds at least min_docs documents."""
    steps: Steps = []
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


def lr_at(step: int, total: int, lc: LoopConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio of the peak."""
    if step < lc.warmup_steps:
        return (step + 1) / lc.warmup_steps
    progress = min(1.0, (step - lc.warmup_steps) / max(1, total - lc.warmup_steps))
    return lc.min_lr_ratio + (1 - lc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_schedule(
    opt: torch.optim.Optimizer, total_steps: int, lc: LoopConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up and cosine decay over `total_steps` optimizer steps."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total_steps, lc))


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


@dataclass
class Epoch:
    """What one pass of the step loop did."""

    steps: int
    loss_ema: float | None
    seconds: float
    tokens: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def run_epoch(
    params: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LambdaLR,
    steps: Steps,
    step_loss: Callable[[list[list[int]]], tuple[float, int]],
    *,
    grad_clip: float,
    desc: str,
    progress: bool = True,
    loss_digits: int = 4,
) -> Epoch:
    """One pass over `steps`. `step_loss` runs forward and backward over one step's micro-batches
    and returns (its loss, real tokens seen); this clips, steps and shows a progress bar."""
    params.train()
    t0, seen, ema = time.time(), 0, None
    bar = tqdm(steps, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    for group in bar:
        opt.zero_grad(set_to_none=True)
        loss, tokens = step_loss(group)
        seen += tokens
        torch.nn.utils.clip_grad_norm_(params.parameters(), grad_clip)
        opt.step()
        sched.step()
        ema = loss if ema is None else 0.9 * ema + 0.1 * loss
        bar.set_postfix(
            loss=f"{ema:.{loss_digits}f}",
            tok_s=f"{seen / (time.time() - t0):.0f}",
            lr=f"{sched.get_last_lr()[0]:.2e}",
        )
    bar.close()
    return Epoch(len(steps), ema, time.time() - t0, seen)


def load_teacher(path: Path, examples: list[Example], labels: list[str]) -> np.ndarray:
    """The teacher's logits (N, labels) in the order of `examples`."""
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read teacher logits {path}: {e}") from e
    if record.get("labels") != labels:
        raise DataError(f"{path} has labels {record.get('labels')}, training has {labels}")
    logits = record["logits"]
    missing = [e.id for e in examples if e.id not in logits]
    if missing:
        raise DataError(f"{path} has no logits for {len(missing)} documents, e.g. {missing[0]}")
    return np.array([logits[e.id] for e in examples], dtype=np.float32)


def evaluate_split(
    model: LinformerClassifier,
    seqs: list[list[int]],
    y: np.ndarray,
    offsets: np.ndarray | None = None,
) -> dict[str, float]:
    """Validation loss and accuracy; F1 and ROC-AUC for two labels, macro F1 for more. With
    `offsets` (N, labels), of the model's logits plus those (a boosted run's bag of words)."""
    from sklearn.metrics import f1_score, roc_auc_score

    logits = predict_logits(model, seqs)
    if offsets is not None:
        logits = logits + offsets
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


def selection_score(val: dict[str, float], select_by: str) -> float:
    """Higher is better: validation AUC where there is one, else minus the validation loss."""
    if select_by == "auc" and "auc" in val and val["auc"] == val["auc"]:  # not NaN
        return val["auc"]
    return -val["loss"]


def consider_average(
    out_dir: Path,
    history: list[dict[str, Any]],
    val_split: tuple[list[list[int]], np.ndarray, np.ndarray | None],
    select_by: str,
    average_last: int,
    state: dict[str, Any],
) -> dict[str, Any]:
    """Keep the mean of the last `average_last` epochs' weights (out_dir/epochs/<n>) as best if
    it validates better; `state` goes into its train_state.json.

    Returns what was kept: {"best_epoch": n} or {"best_epoch": "average of epochs a-b",
    "averaged": {"epochs": [...], "val": {...}}}.
    """

    def score(r: dict[str, Any]) -> float:
        return selection_score({k[4:]: v for k, v in r.items() if k.startswith("val_")}, select_by)

    best = max(history, key=score)
    kept: dict[str, Any] = {"best_epoch": best["epoch"]}
    epochs = [r["epoch"] for r in history][-average_last:]
    if average_last < 2 or len(epochs) < 2:
        return kept
    model = average_checkpoints([out_dir / "epochs" / str(e) for e in epochs])
    val = evaluate_split(model, *val_split)
    averaged = {"epochs": epochs, "val": val}
    print(
        json.dumps({"average_of_epochs": epochs, **{f"val_{k}": v for k, v in val.items()}}),
        file=sys.stderr,
    )
    if selection_score(val, select_by) > score(best):
        name = f"average of epochs {epochs[0]}-{epochs[-1]}"
        save_checkpoint(model, out_dir / "best", {"epoch": name, "val": val, **state})
        kept = {"best_epoch": name}
    return {**kept, "averaged": averaged}


def finish_run(out_dir: Path, manifest: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """The run's summary and where it came from (data, code, machine, date), as run.json."""
    summary = {
        **summary,
        "data_sha256": manifest.get("sha256"),
        "data_source": manifest.get("source"),
        "code_version": code_version(),
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d"),
    }
    (out_dir / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def add_model_args(p: argparse.ArgumentParser, pooling: bool = True) -> tuple[str, ...]:
    """The model-size options the training commands take; returns the ModelConfig keys set."""
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
        value = getattr(default, f.name)
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            p.add_argument(flag, type=type(value), default=value)


def dataclass_from_args(cls: type[Any], args: argparse.Namespace) -> Any:
    """The config dataclass the options of `add_dataclass_args` describe."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def run_command(
    argv: list[str] | None,
    prog: str,
    config_cls: type[Any],
    run: Callable[..., dict[str, Any]],
    done: str,
    *,
    description: str | None = None,
    pooling: bool = True,
    out_help: str = "run directory",
) -> int:
    """A training command: --data, --out, the model sizes and the config's fields. Calls
    run(data, out, model_config, config, progress=...), then prints `done` formatted with the
    summary's keys and `out`."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--data", type=Path, required=True, help="directory written by linmod-data")
    p.add_argument("--out", type=Path, required=True, help=out_help)
    model_keys = add_model_args(p, pooling=pooling)
    add_dataclass_args(p, config_cls)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        mc = ModelConfig(**{f: getattr(args, f) for f in model_keys})
        config = dataclass_from_args(config_cls, args)
        summary = run(args.data, args.out, mc, config, progress=not args.no_progress)
    except (DataError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(done.format(**summary, out=args.out))
    return 0
