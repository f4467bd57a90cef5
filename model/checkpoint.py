"""Checkpoints as safetensors weights plus JSON config; never pickle."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.data import DataError
from model.linformer import LinformerClassifier
from service.artifact import MODEL_CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE

WEIGHTS, CONFIG = WEIGHTS_FILE, MODEL_CONFIG_FILE


class CheckpointError(Exception):
    """A checkpoint directory that is missing, incomplete or does not match its config."""


def save_checkpoint(
    model: LinformerClassifier, out_dir: Path, extra: dict[str, Any] | None = None
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS))
    model.cfg.save(out_dir / CONFIG)
    if extra is not None:
        (out_dir / "train_state.json").write_text(json.dumps(extra, indent=2) + "\n")


def load_checkpoint(ckpt_dir: Path, device: str = "cpu") -> LinformerClassifier:
    """The model in eval mode; clear errors for a missing or mismatched checkpoint."""
    weights, config = ckpt_dir / WEIGHTS, ckpt_dir / CONFIG
    for path in (weights, config):
        if not path.exists():
            raise CheckpointError(f"checkpoint incomplete: {path} does not exist")
    try:
        cfg = ModelConfig.load(config)
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config} is not a valid model config: {e}") from e
    model = LinformerClassifier(cfg)
    try:
        state = load_file(str(weights), device=device)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"cannot read {weights}: {e}") from e
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {missing[:3]}")
        if unexpected:
            details.append(f"unexpected {unexpected[:3]}")
        if wrong:
            k = wrong[0]
            details.append(
                f"{k} has shape {tuple(state[k].shape)}, config implies {tuple(expected[k].shape)}"
            )
        raise CheckpointError(f"{weights} does not match {config}: {'; '.join(details)}")
    model.load_state_dict(state)
    return model.to(device).eval()


def load_pretrained(
    init_dir: Path, mc: ModelConfig, head: bool = False
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Sizes and encoder weights of a run (or artifact) to start from; dropout and pooling stay
    as given. An in-graph bag-of-words branch is not carried over: linmod-bow fits it afresh."""
    ckpt = init_dir / "last"
    if not ckpt.exists() and (init_dir / WEIGHTS).exists():
        ckpt = init_dir  # an exported artifact: the same files at the top level
    for path in (init_dir / TOKENIZER_FILE, ckpt / CONFIG, ckpt / WEIGHTS):
        if not path.exists():
            raise DataError(f"{init_dir} is not a linmod-pretrain run: {path} does not exist")
    pre = ModelConfig.load(ckpt / CONFIG)
    mc = dataclasses.replace(
        pre, dropout=mc.dropout, pooling=pre.pooling if head else mc.pooling, bow=False
    )
    state = load_file(str(ckpt / WEIGHTS))
    return mc, {
        k: v
        for k, v in state.items()
        if (head or not k.startswith("head.")) and not k.startswith("bow.")
    }


def average_checkpoints(ckpt_dirs: list[Path]) -> LinformerClassifier:
    """One model whose weights are the mean of several checkpoints of the same config."""
    models = [load_checkpoint(d) for d in ckpt_dirs]
    if not models:
        raise CheckpointError("no checkpoints to average")
    avg = models[0]
    states = [m.state_dict() for m in models]
    with torch.no_grad():
        avg.load_state_dict(
            {k: torch.stack([s[k].float() for s in states]).mean(0) for k in states[0]}
        )
    return avg


def code_version() -> str:
    """The git commit of the code that produced an artifact, or 'unknown' outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"
