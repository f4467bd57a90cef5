"""Length-bucketed, right-padded batches and batched inference, shared by training and evaluation."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch

from model.linformer import LinformerClassifier
from service.artifact import pad_batch
from service.artifact import softmax as softmax  # the training commands read probabilities


def length_batches(
    lengths: Sequence[int],
    max_tokens: int,
    max_batch: int,
    rng: random.Random | None = None,
) -> list[list[int]]:
    """Index batches whose padded size (count x longest) stays within max_tokens.

    Sorting by length keeps padding low; with an rng, lengths get jitter inside their bucket and
    the batch order is shuffled, so epochs differ but batches stay tight.
    """
    order = list(range(len(lengths)))
    if rng is not None:
        order.sort(key=lambda i: lengths[i] * (1.0 + 0.1 * rng.random()))
    else:
        order.sort(key=lambda i: lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        n = max(longest, lengths[i])
        if cur and (len(cur) + 1 > max_batch or (len(cur) + 1) * n > max_tokens):
            batches.append(cur)
            cur, n = [], lengths[i]
        cur.append(i)
        longest = n
    if cur:
        batches.append(cur)
    if rng is not None:
        rng.shuffle(batches)
    return batches


def collate(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: (input_ids, attention_mask), both int64 (B, T)."""
    ids, mask = pad_batch(seqs, pad_id)
    return torch.from_numpy(ids), torch.from_numpy(mask)


@torch.no_grad()
def predict_logits(
    model: LinformerClassifier,
    seqs: Sequence[Sequence[int]],
    max_tokens: int = 32768,
    max_batch: int = 64,
    progress: bool = False,
) -> np.ndarray:
    """Logits (N, num_labels) in input order; each sequence must fit n_max."""
    model.eval()
    device = next(model.parameters()).device
    out = np.zeros((len(seqs), model.cfg.num_labels), dtype=np.float32)
    batches = length_batches([len(s) for s in seqs], max_tokens, max_batch)
    it = batches
    if progress:
        from tqdm import tqdm

        it = tqdm(batches, desc="predict", unit="batch", leave=False)
    for idx in it:
        ids, mask = collate([seqs[i] for i in idx], model.cfg.pad_id)
        logits = model(ids.to(device), mask.to(device))
        out[idx] = logits.float().cpu().numpy()
    return out
