"""Self-supervised pre-training: masked-language modelling on the training split's own text.

With no pre-trained encoder to start from, the encoder first learns the language of the corpus
from its unlabelled text (downstream data alone makes a useful pre-training corpus: Krishna et
al., 2022), then `linmod-train --init` fine-tunes it on the labels. The run directory holds
tokenizer.json, last/ (a classifier checkpoint whose head is untrained), mlm_head.safetensors,
history.json and run.json.
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

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from model.batching import collate
from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.data import DataError, read_manifest, read_split
from model.linformer import LinformerClassifier
from model.tokenizer import MASK_ID, PAD_ID, encode
from model.training import (
    finish_run,
    make_optimizer,
    make_schedule,
    plan_steps,
    run_command,
    run_epoch,
    setup,
    tokenizer_for,
)

FIRST_ORDINARY_ID = MASK_ID + 1  # ids below are special tokens, never drawn as random words


@dataclass
class PretrainConfig:
    epochs: int = 10
    lr: float = 5e-4
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    warmup_steps: int = 200
    max_tokens: int = 8192
    max_batch: int = 64
    min_docs_per_step: int = 32
    # Each epoch reads one random window of at most this many tokens from every document: most
    # of the text at a fraction of the cost of whole 4,096-token documents.
    window: int = 1024
    mask_prob: float = 0.15  # BERT's recipe: of those, 80% <mask>, 10% a random token, 10% kept
    grad_clip: float = 1.0
    seed: int = 1234
    threads: int = 0
    vocab_size: int = 16000


class MaskedLMHead(nn.Module):
    """Hidden state -> vocabulary logits, decoding with the (tied) token embedding matrix."""

    def __init__(self, cfg: ModelConfig, tok_emb: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.tok_emb = tok_emb  # shared, not copied: its gradient reaches the encoder's table

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, C) -> (N, V)
        return F.linear(self.norm(F.gelu(self.dense(h))), self.tok_emb.weight, self.bias)


def mask_tokens(
    ids: torch.Tensor, keep: torch.Tensor, prob: float, vocab_size: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(corrupted ids, targets): targets are -100 except at the chosen real positions."""
    chosen = (torch.rand(ids.shape, generator=gen) < prob) & keep
    targets = torch.where(chosen, ids, -100)
    roll = torch.rand(ids.shape, generator=gen)
    corrupted = torch.where(chosen & (roll < 0.8), MASK_ID, ids)
    random_ids = torch.randint(FIRST_ORDINARY_ID, vocab_size, ids.shape, generator=gen)
    corrupted = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, corrupted)
    return corrupted, targets


def random_windows(seqs: list[list[int]], window: int, rng: random.Random) -> list[list[int]]:
    """One random contiguous window of at most `window` tokens from each sequence."""
    out = []
    for s in seqs:
        start = rng.randrange(len(s) - window + 1) if len(s) > window else 0
        out.append(s[start : start + window])
    return out


def pretrain(
    data_dir: Path, out_dir: Path, mc: ModelConfig, pc: PretrainConfig, progress: bool = True
) -> dict[str, Any]:
    """Masked-language pre-training on the training split; returns the run summary."""
    device = setup(pc.seed, pc.threads)
    if not 0 < pc.mask_prob < 1:
        raise ValueError(f"mask probability must be between 0 and 1, not {pc.mask_prob}")
    if not 0 < pc.window <= mc.n_max:
        raise ValueError(f"window must be between 1 and n_max={mc.n_max}, not {pc.window}")
    manifest = read_manifest(data_dir)
    train_ex = read_split(data_dir, "train")
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_for(out_dir, (e.text for e in train_ex), pc.vocab_size)
    if tok.token_to_id("<mask>") != MASK_ID:
        raise DataError(
            f"{out_dir / 'tokenizer.json'} has no <mask> token at id {MASK_ID}; delete it to retrain"
        )
    labels = list(manifest["labels"])  # type: ignore[call-overload]
    mc = dataclasses.replace(mc, vocab_size=tok.get_vocab_size(), labels=labels, pad_id=PAD_ID)
    seqs = [s for s in encode(tok, [e.text for e in train_ex]) if s]
    if not seqs:
        raise DataError("the training split tokenizes to nothing")

    model = LinformerClassifier(mc).to(device)
    head = MaskedLMHead(mc, model.tok_emb).to(device)
    # The classifier's head gets no gradient here; leaving it out keeps AdamW from decaying it.
    params = nn.ModuleDict({"encoder": model, "mlm": head})
    opt = make_optimizer(params, pc.lr, pc.weight_decay)
    rng = random.Random(pc.seed)
    gen = torch.Generator().manual_seed(pc.seed)
    win_lengths = [min(len(s), pc.window) for s in seqs]
    steps_per_epoch = len(plan_steps(win_lengths, pc))
    sched = make_schedule(opt, steps_per_epoch * pc.epochs, pc)
    print(
        f"pre-training: {model.num_parameters() / 1e6:.2f}M parameters, {len(seqs)} documents, "
        f"{sum(win_lengths)} tokens an epoch in windows of at most {pc.window}, "
        f"{steps_per_epoch} steps/epoch, device {device}",
        file=sys.stderr,
    )
    history: list[dict[str, Any]] = []
    started = time.time()
    for epoch in range(1, pc.epochs + 1):
        windows = random_windows(seqs, pc.window, rng)
        masked = {"loss": 0.0, "tokens": 0.0}

        def step_loss(
            group: list[list[int]],
            windows: list[list[int]] = windows,
            masked: dict[str, float] = masked,
        ) -> tuple[float, int]:
            batches = []
            for idx in group:
                ids, mask = collate([windows[i] for i in idx], mc.pad_id)
                corrupted, targets = mask_tokens(ids, mask.bool(), pc.mask_prob, mc.vocab_size, gen)
                batches.append((corrupted, targets, mask))
            # Every masked token weighs the same, whatever micro-batch its window landed in.
            n_masked = max(1, sum(int((t != -100).sum()) for _, t, _ in batches))
            step_loss, seen = 0.0, 0
            for corrupted, targets, mask in batches:
                h, _ = model.encode(corrupted.to(device), mask.to(device))
                sel = targets.to(device) != -100
                logits = head(h[sel])  # (N, V): only masked positions are decoded
                loss = F.cross_entropy(logits, targets.to(device)[sel], reduction="sum") / n_masked
                loss.backward()
                step_loss += loss.item()
                seen += int(mask.sum())
            masked["loss"] += step_loss * n_masked
            masked["tokens"] += n_masked
            return step_loss, seen

        done = run_epoch(
            params, opt, sched, plan_steps([len(w) for w in windows], pc, rng), step_loss,
            grad_clip=pc.grad_clip, desc=f"pretrain {epoch}/{pc.epochs}", progress=progress,
            loss_digits=3,
        )  # fmt: skip
        record = {
            "epoch": epoch,
            "mlm_loss": masked["loss"] / max(1, masked["tokens"]),
            "train_seconds": done.seconds,
            "tokens_per_second": done.tokens_per_second,
        }
        history.append(record)
        print(json.dumps(record), file=sys.stderr)
        save_checkpoint(model, out_dir / "last", {"epoch": epoch, "pretrain": record})
        head_state = {
            k: v.detach().cpu().contiguous()
            for k, v in head.state_dict().items()
            if not k.startswith("tok_emb")
        }
        save_file(head_state, str(out_dir / "mlm_head.safetensors"))
        (out_dir / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    summary = {
        "model_config": mc.to_dict(),
        "pretrain_config": dataclasses.asdict(pc),
        "parameters": model.num_parameters(),
        "wall_seconds": round(time.time() - started, 1),
        "documents": len(seqs),
        "final_mlm_loss": history[-1]["mlm_loss"],
    }
    return finish_run(out_dir, manifest, summary)


def main(argv: list[str] | None = None) -> int:
    done = "done in {wall_seconds} s; masked-LM loss {final_mlm_loss:.3f}; fine-tune with "
    done += "linmod-train --init {out}"
    return run_command(
        argv, "linmod-pretrain", PretrainConfig, pretrain, done,
        description=__doc__, pooling=False, out_help="pre-training run directory",
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
