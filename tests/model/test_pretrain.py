"""Masked-language pre-training: the masking rule, a tiny run, and fine-tuning from it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint
from model.config import ModelConfig
from model.pretrain import PretrainConfig, mask_tokens, pretrain, random_windows
from model.tokenizer import MASK_ID
from model.train import TrainConfig, main, train
from tests.conftest import TINY_MODEL, TINY_TRAIN

TINY_PRETRAIN = {
    "epochs": 2,
    "vocab_size": 600,
    "max_tokens": 2048,
    "min_docs_per_step": 8,
    "warmup_steps": 2,
    "window": 48,
    "lr": 3e-3,
    "seed": 7,
}


def test_masking_touches_only_real_tokens_in_bert_proportions() -> None:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (64, 200))
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[:, 150:] = False  # padding
    corrupted, targets = mask_tokens(ids, keep, 0.15, 500, gen)
    chosen = targets != -100
    assert not chosen[:, 150:].any() and torch.equal(corrupted[:, 150:], ids[:, 150:])
    assert torch.equal(targets[chosen], ids[chosen])
    assert 0.13 < chosen[keep].float().mean() < 0.17
    as_mask = (corrupted == MASK_ID)[chosen].float().mean()
    unchanged = (corrupted == ids)[chosen].float().mean()
    assert 0.75 < as_mask < 0.85 and 0.07 < unchanged < 0.15
    assert (corrupted[~chosen] == ids[~chosen]).all()
    assert (corrupted[chosen] > MASK_ID).sum() + (
        corrupted[chosen] == MASK_ID
    ).sum() == chosen.sum()


def test_random_windows_stay_inside_each_document() -> None:
    seqs = [list(range(n)) for n in (3, 10, 100)]
    for w in random_windows(seqs, 10, random.Random(0)) + random_windows(
        seqs, 10, random.Random(1)
    ):
        assert 1 <= len(w) <= 10 and w == list(range(w[0], w[0] + len(w)))


@pytest.mark.slow
def test_pretraining_learns_and_fine_tuning_starts_from_it(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pc = PretrainConfig(**{**TINY_PRETRAIN, "epochs": 6})
    summary = pretrain(tiny_data, tmp_path / "pre", ModelConfig(**TINY_MODEL), pc, progress=False)
    losses = [h["mlm_loss"] for h in json.loads((tmp_path / "pre" / "history.json").read_text())]
    assert losses[-1] < losses[0]  # it learns something about the text
    assert summary["parameters"] > 0 and (tmp_path / "pre" / "mlm_head.safetensors").exists()
    pre = load_checkpoint(tmp_path / "pre" / "last").state_dict()

    # Fine-tuning with no steps' worth of learning rate keeps the encoder as pre-trained.
    tc = TrainConfig(**{**TINY_TRAIN, "epochs": 1, "lr": 1e-12, "init": str(tmp_path / "pre")})
    mc = ModelConfig(**{**TINY_MODEL, "d_model": 64, "pooling": "mean_max"})  # sizes come from init
    train(tiny_data, tmp_path / "ft", mc, tc, progress=False)
    ft = load_checkpoint(tmp_path / "ft" / "last")
    assert ft.cfg.d_model == TINY_MODEL["d_model"] and ft.cfg.pooling == "mean_max"
    state = ft.state_dict()
    for k in ("tok_emb.weight", "proj.0", "blocks.1.attn.q.weight"):
        assert torch.allclose(state[k], pre[k], atol=1e-6)
    assert state["head.weight"].shape == (2, 2 * TINY_MODEL["d_model"])
    tok = (tmp_path / "ft" / "tokenizer.json").read_bytes()
    assert tok == (tmp_path / "pre" / "tokenizer.json").read_bytes()

    # Fine-tuning with token dropout runs and changes the weights.
    tc = TrainConfig(
        **{**TINY_TRAIN, "epochs": 1, "token_dropout": 0.2, "init": str(tmp_path / "pre")}
    )
    train(tiny_data, tmp_path / "td", ModelConfig(**TINY_MODEL), tc, progress=False)
    td = load_checkpoint(tmp_path / "td" / "last").state_dict()
    assert not torch.allclose(td["tok_emb.weight"], pre["tok_emb.weight"])


def test_bad_pretraining_input_is_a_clear_message(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from model.pretrain import main as pretrain_main

    args = ["--data", str(tiny_data), "--out", str(tmp_path / "p"), "--no-progress"]
    assert pretrain_main([*args, "--mask-prob", "1.5"]) == 2
    assert "mask probability must be between 0 and 1" in capsys.readouterr().err
    assert pretrain_main([*args, "--window", "9000"]) == 2
    assert "window must be between 1 and n_max=4096" in capsys.readouterr().err
    assert pretrain_main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "q")]) == 2
    assert "run `linmod-data` first" in capsys.readouterr().err

    targs = ["--data", str(tiny_data), "--out", str(tmp_path / "t"), "--no-progress"]
    assert main([*targs, "--init", str(tmp_path)]) == 2
    assert "is not a linmod-pretrain run" in capsys.readouterr().err
