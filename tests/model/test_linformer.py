"""The Linformer classifier: padding invariance (property test), sharing modes, refusing long input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.batching import collate
from model.config import ModelConfig
from model.linformer import LinformerClassifier, SequenceTooLongError

N_MAX = 48
VOCAB = 97


def tiny(sharing: str = "layerwise", **kw: object) -> LinformerClassifier:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        n_max=N_MAX,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=48,
        k=8,
        sharing=sharing,
        dropout=0.0,
        **kw,
    )  # type: ignore[arg-type]
    return LinformerClassifier(cfg).eval()


MODELS = {s: tiny(s) for s in ("none", "kv", "layerwise")}
# The property test covers both poolings and the local convolution as well as the sharing modes.
VARIANTS = {
    **MODELS,
    "mean_max": tiny("layerwise", pooling="mean_max"),
    "conv": tiny("layerwise", conv_kernel=5),
}
doc = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=N_MAX)


@settings(max_examples=100, deadline=None)
@given(
    variant=st.sampled_from(sorted(VARIANTS)),
    target=doc,
    others=st.lists(doc, min_size=1, max_size=3),
    pad_fill=st.integers(0, VOCAB - 1),
)
def test_logits_do_not_depend_on_batch_or_padding(
    variant: str, target: list[int], others: list[list[int]], pad_fill: int
) -> None:
    model = VARIANTS[variant]
    with torch.no_grad():
        ids, mask = collate([target])
        alone = model(ids, mask)[0]

        # Beside longer documents: every other document is at least as long as the target.
        longer = [o + [1] * max(0, len(target) - len(o)) for o in others]
        ids, mask = collate([target, *longer])
        ids[mask == 0] = pad_fill  # the pad token id must not matter
        in_batch = model(ids, mask)[0]

        # Padded all the way to n_max.
        ids = torch.full((1, N_MAX), pad_fill, dtype=torch.long)
        mask = torch.zeros((1, N_MAX), dtype=torch.long)
        ids[0, : len(target)] = torch.tensor(target)
        mask[0, : len(target)] = 1
        padded = model(ids, mask)[0]

    assert torch.allclose(alone, in_batch, atol=1e-5, rtol=0), (alone, in_batch)
    assert torch.allclose(alone, padded, atol=1e-5, rtol=0), (alone, padded)


def test_nan_in_pad_positions_does_not_leak() -> None:
    """`where`, not a multiply: even inf/nan activations at pad positions stay out."""
    model = MODELS["layerwise"]
    ids, mask = collate([[5, 6, 7], [1] * 10])
    with torch.no_grad():
        ref = model(*collate([[5, 6, 7]]))[0]
        hook = model.blocks[0].attn.k.register_forward_hook(
            lambda _m, _i, out: torch.where(mask.bool().unsqueeze(-1), out, float("nan"))
        )
        try:
            out = model(ids, mask)
        finally:
            hook.remove()
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0], ref, atol=1e-5)


def test_sharing_modes_hold_the_expected_projections() -> None:
    counts = {s: len(m.proj) for s, m in MODELS.items()}
    assert counts == {"none": 4, "kv": 2, "layerwise": 1}
    E, F = MODELS["kv"].projections(1)
    assert E is F
    E, F = MODELS["none"].projections(1)
    assert E is not F


def test_longer_input_than_n_max_is_refused_with_a_clear_error() -> None:
    model = MODELS["layerwise"]
    ids = torch.ones((1, N_MAX + 1), dtype=torch.long)
    with pytest.raises(SequenceTooLongError, match=f"at most n_max={N_MAX}"):
        model(ids, torch.ones_like(ids))
    # Exactly n_max is fine.
    assert model(ids[:, :N_MAX], torch.ones_like(ids[:, :N_MAX])).shape == (1, 2)


def test_full_attention_variant_is_padding_invariant_too() -> None:
    model = tiny(attention="full")
    assert len(model.proj) == 0
    with torch.no_grad():
        a = model(*collate([[3, 4, 5]]))[0]
        b = model(*collate([[3, 4, 5], [9] * 20]))[0]
    assert torch.allclose(a, b, atol=1e-5)


def test_config_validation_messages() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="sharing"):
        ModelConfig(sharing="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown model config keys: bogus"):
        ModelConfig.from_dict({"bogus": 1})


def test_shipped_model_accepts_at_least_4096_tokens() -> None:
    import json
    from pathlib import Path

    cfg = (
        Path(__file__).parents[2] / "model" / "artifacts" / "spamassassin-linformer" / "config.json"
    )
    if not cfg.exists():
        pytest.skip("the shipped artifact is not in this checkout")
    assert json.loads(cfg.read_text())["n_max"] >= 4096
