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
    # The layout a converted BERT encoder uses: post-norm, pooled projection, bag of words.
    "bert": tiny("layerwise", norm="post", projection="pooled", qk_norm=False, bow=True),
}


def _random_bow(model: LinformerClassifier) -> None:
    assert model.bow is not None
    g = torch.Generator().manual_seed(1)
    model.bow.idf.copy_(torch.rand(VOCAB, generator=g) * (torch.rand(VOCAB, generator=g) > 0.3))
    model.bow.weight.copy_(torch.randn(VOCAB, 2, generator=g))


_random_bow(VARIANTS["bert"])
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


def test_pooled_projection_is_exact_attention_up_to_k_tokens() -> None:
    """Up to k tokens every token keeps a slot of its own: the same logits as full attention."""
    pooled = tiny(norm="post", projection="pooled", qk_norm=False)
    full = tiny(norm="post", projection="pooled", qk_norm=False, attention="full")
    with torch.no_grad():  # sharper attention than a fresh initialisation's near-uniform one
        for b in pooled.blocks:
            b.attn.q.weight.mul_(100.0)
    full.load_state_dict(pooled.state_dict())
    k = pooled.cfg.k
    with torch.no_grad():
        short = collate([[3, 4, 5], list(range(10, 10 + k))])
        assert torch.allclose(pooled(*short), full(*short), atol=1e-5)
        # Past k tokens segments are averaged: an approximation, no longer the same states.
        longer = collate([list(range(10, 10 + 3 * k))])
        assert not torch.allclose(pooled.encode(*longer)[0], full.encode(*longer)[0], atol=1e-2)


def test_segment_pooling_weights_and_bias() -> None:
    from model.linformer import segment_pooling

    keep = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [1] * 8]).bool()
    pool, bias = segment_pooling(keep, 4)
    assert pool.shape == (2, 8, 4) and bias.shape == (2, 1, 1, 4)
    # Three tokens in four slots: one slot each, one slot empty and masked out.
    assert torch.equal(pool[0, :3].argmax(-1), torch.tensor([0, 1, 2]))
    assert bias[0, 0, 0, 3] < -1e3 and torch.allclose(bias[0, 0, 0, :3], torch.zeros(3))
    assert (pool[0, 3:] == 0).all()
    # Eight tokens in four slots: pairs, each averaged, each weighing log 2.
    assert torch.allclose(pool[1].sum(0), torch.ones(4))
    assert torch.allclose(bias[1, 0, 0], torch.full((4,), float(torch.log(torch.tensor(2.0)))))


def test_bag_of_words_branch_matches_sklearn() -> None:
    """The in-graph TF-IDF + linear layer gives the regression's own decision function."""
    import numpy as np

    from model.bow import fit_bow

    rng = np.random.default_rng(0)
    docs = [list(rng.integers(1, VOCAB, rng.integers(3, 40))) for _ in range(60)]
    y = np.array([int(sum(d) % 2) for d in docs])
    state = fit_bow(docs, y, VOCAB, 2, c=5.0)
    model = tiny(bow=True)
    assert model.bow is not None
    model.bow.load_state_dict({k.removeprefix("bow."): v for k, v in state.items()})
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(analyzer=lambda d: d, sublinear_tf=True, min_df=2)
    lr = LogisticRegression(C=5.0, max_iter=5000).fit(vec.fit_transform(docs), y)
    want = lr.decision_function(vec.transform(docs[:8]))
    ids, mask = collate(docs[:8])
    with torch.no_grad():
        z = model.bow(ids, mask.bool())
    assert torch.allclose(z[:, 1] - z[:, 0], torch.tensor(want, dtype=torch.float32), atol=1e-4)
