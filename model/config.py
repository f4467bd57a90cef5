"""Model configuration: one dataclass passed to every module constructor."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Sharing = Literal["none", "kv", "layerwise"]
Attention = Literal["linformer", "full"]
Pooling = Literal["mean", "mean_max"]
Norm = Literal["pre", "post"]
Projection = Literal["learned", "pooled"]


@dataclass
class ModelConfig:
    vocab_size: int = 16000
    n_max: int = 4096  # longest window the model accepts; rows of E/F and position embeddings
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 1024
    k: int = 128  # Linformer projected length
    # "none": E and F per layer; "kv": one E (= F) per layer; "layerwise": one E for all layers.
    sharing: Sharing = "layerwise"
    # "full" swaps in scaled_dot_product_attention over all tokens (benchmarks only).
    attention: Attention = "linformer"
    # LayerNorm on each head's queries and (projected) keys: without it attention logits grew
    # past 100 and training collapsed within three epochs on the SpamAssassin corpus.
    qk_norm: bool = True
    # "mean": masked mean of the final states; "mean_max": the masked mean and the masked max side
    # by side, so one strong phrase anywhere in a long document can carry the decision.
    pooling: Pooling = "mean"
    # Odd kernel width of a depthwise convolution before attention in every block; 0: none.
    conv_kernel: int = 0
    # "pre": LayerNorm before attention and MLP (trains stably from scratch); "post": after the
    # residual sum, with a LayerNorm on the embeddings, as BERT does (for converted encoders).
    norm: Norm = "pre"
    norm_eps: float = 1e-5
    # "learned": E/F parameters of shape (n_max, k), as in the paper's main variant. "pooled":
    # the paper's "general projection" by mean pooling with kernel and stride n/k, where n is the
    # document's own length: a document of at most k tokens keeps one slot per token (exact full
    # attention), a longer one is averaged in k contiguous segments, each weighted by its size.
    projection: Projection = "learned"
    # A bag-of-words branch beside the encoder: TF-IDF of the window's token ids (sublinear tf,
    # L2-normalised) through a linear layer, its logits added to the encoder's. Its weights are
    # fitted by logistic regression on the training split (model/bow.py), not by gradient steps.
    bow: bool = False
    dropout: float = 0.1
    pad_id: int = 0
    labels: list[str] = field(default_factory=lambda: ["ham", "spam"])

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.sharing not in ("none", "kv", "layerwise"):
            raise ValueError(f"sharing must be none, kv or layerwise, not {self.sharing!r}")
        if self.attention not in ("linformer", "full"):
            raise ValueError(f"attention must be linformer or full, not {self.attention!r}")
        if self.pooling not in ("mean", "mean_max"):
            raise ValueError(f"pooling must be mean or mean_max, not {self.pooling!r}")
        if self.conv_kernel < 0 or (self.conv_kernel and self.conv_kernel % 2 == 0):
            raise ValueError(f"conv_kernel must be 0 or odd, not {self.conv_kernel}")
        if self.norm not in ("pre", "post"):
            raise ValueError(f"norm must be pre or post, not {self.norm!r}")
        if self.projection not in ("learned", "pooled"):
            raise ValueError(f"projection must be learned or pooled, not {self.projection!r}")
        if len(self.labels) < 2:
            raise ValueError("a classifier needs at least two labels")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        return cls.from_dict(json.loads(path.read_text()))
