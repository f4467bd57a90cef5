"""Linformer encoder and classifier (Wang et al., 2020), padding-invariant by construction.

Keys and values are projected along the sequence axis by E, F of shape (n_max, k). Pad rows of
K and V are zeroed (with `where`, after their linear projection) before that projection at every
layer, E and F are sliced to the batch length with no branch on the shape, and pooling is masked,
so a document's logits do not depend on what it is batched with; tests/model/test_linformer.py
checks it for a document alone, beside longer ones and padded to n_max.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig


class SequenceTooLongError(ValueError):
    """Input longer than the model's n_max; the service chunks before it gets here."""


class SequenceProjection:
    """How one layer maps T keys/values to k: learned E/F, or pooling over the document's length."""

    def __init__(
        self,
        E: torch.Tensor,  # (n_max, k) learned, or (B, T, k) pooling weights
        F_: torch.Tensor,
        scale: torch.Tensor,  # (B, 1, 1): 1/sqrt(real length); unused when pooling
        bias: torch.Tensor,  # (B, 1, 1, k): log segment sizes when pooling; 0 otherwise
    ) -> None:
        self.E, self.F_, self.scale, self.bias = E, F_, scale, bias

    def apply(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, C) keys and values (pad rows zeroed) -> (B, k, C) each."""
        T = k.shape[1]
        if self.E.dim() == 3:  # per-document pooling weights, already (B, T, k)
            return self.E.transpose(1, 2) @ k, self.F_.transpose(1, 2) @ v
        # Slice to the batch length with no branch on the shape, so an exported graph keeps
        # the Slice and stays dynamic in T. Rows 0..L-1 line up with a right-padded document.
        E_T = self.E[:T].transpose(0, 1)  # (k, T)
        F_T = self.F_[:T].transpose(0, 1)
        # Normalising by the document's own length keeps the projected keys on one scale for
        # 10 tokens and 4,096 alike; it depends on the mask only, never on the batch.
        return torch.matmul(E_T, k) * self.scale, torch.matmul(F_T, v) * self.scale


def segment_pooling(keep: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooling weights (B, T, k) over k contiguous segments of each document's real tokens,
    and the attention bias (B, 1, 1, k): log of each segment's size, a large negative when empty.

    Token t of a document of length L goes to segment floor(t * k / L): with L <= k every token
    has a slot of its own, so attention is exact; the log-size bias makes a segment of n equal
    keys weigh as n keys would. Both depend on the document's own mask only, never on the batch.
    """
    T = keep.shape[1]
    lengths = keep.sum(dim=-1, keepdim=True).clamp(min=1)  # (B, 1) int64
    pos = torch.arange(T, device=keep.device).unsqueeze(0)  # (1, T)
    seg = torch.div(pos * k, lengths, rounding_mode="floor")  # (B, T)
    slots = torch.arange(k, device=keep.device)  # (k,)
    onehot = (seg.unsqueeze(-1) == slots) & keep.unsqueeze(-1)  # (B, T, k)
    weights = onehot.float()
    counts = weights.sum(dim=1, keepdim=True)  # (B, 1, k)
    pool = weights / counts.clamp(min=1.0)
    # -1e4 rather than -inf: finite in fp16 as well, and exp() of it is 0 next to any real slot.
    bias = torch.where(counts > 0, torch.log(counts.clamp(min=1.0)), -1e4)  # (B, 1, k)
    return pool, bias.unsqueeze(1)


class LinformerSelfAttention(nn.Module):
    """Multi-head self-attention over k projected keys/values instead of all T tokens."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.full = cfg.attention == "full"
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.k = nn.Linear(cfg.d_model, cfg.d_model)
        self.v = nn.Linear(cfg.d_model, cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.attn_drop = nn.Dropout(cfg.dropout)
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.q_norm = nn.LayerNorm(self.head_dim) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if cfg.qk_norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        keep: torch.Tensor,  # (B, T) bool, True for real tokens
        proj: SequenceProjection,
    ) -> torch.Tensor:
        B, T, C = x.shape
        nh, hs = self.n_heads, self.head_dim
        q = self.q(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k(x)  # (B, T, C)
        v = self.v(x)
        q = self.q_norm(q)
        if self.full:
            k = self.k_norm(k.view(B, T, nh, hs).transpose(1, 2))
            v = v.view(B, T, nh, hs).transpose(1, 2)
            mask = keep[:, None, None, :]  # (B, 1, 1, T)
            drop = self.attn_drop.p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        else:
            # Zero pad rows after the projection (its bias would leak otherwise) and before E/F.
            # `where`, not a multiply: a pad row holding inf/nan must not turn into nan.
            keep3 = keep.unsqueeze(-1)  # (B, T, 1)
            k = torch.where(keep3, k, 0.0)
            v = torch.where(keep3, v, 0.0)
            kp, vp = proj.apply(k, v)  # (B, k, C) each
            kp = self.k_norm(kp.view(B, -1, nh, hs).transpose(1, 2))  # (B, nh, k, hs)
            vp = vp.view(B, -1, nh, hs).transpose(1, 2)
            att = torch.matmul(q, kp.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, k)
            att = self.attn_drop(torch.softmax(att + proj.bias, dim=-1))
            y = torch.matmul(att, vp)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.out(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class LocalConv(nn.Module):
    """Depthwise convolution over neighbouring tokens, then a pointwise projection.

    Attention over k projected slots resolves position only coarsely; this sees exact local
    phrases. Pad rows are zeroed first, so a real token near the end sees the same zeros whether
    the batch is padded past it or the convolution's own padding is.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        k = cfg.conv_kernel
        self.conv = nn.Conv1d(cfg.d_model, cfg.d_model, k, padding=k // 2, groups=cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        x = torch.where(keep.unsqueeze(-1), x, 0.0)
        y = self.conv(x.transpose(1, 2)).transpose(1, 2)  # (B, T, C)
        return self.drop(self.proj(F.gelu(y)))


class Block(nn.Module):
    """Transformer block: pre-norm (with an optional local convolution first), or BERT's post-norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.post = cfg.norm == "post"
        self.ln0 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.conv_kernel else None
        self.conv = LocalConv(cfg) if cfg.conv_kernel else None
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = LinformerSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, keep: torch.Tensor, proj: SequenceProjection
    ) -> torch.Tensor:
        if self.conv is not None and self.ln0 is not None:
            x = x + self.conv(self.ln0(x), keep)
        if self.post:
            x = self.ln1(x + self.attn(x, keep, proj))
            return self.ln2(x + self.mlp(x))
        x = x + self.attn(self.ln1(x), keep, proj)
        return x + self.mlp(self.ln2(x))


class BagOfWords(nn.Module):
    """TF-IDF of a window's token ids (1 + log tf, times idf, L2-normalised) -> logits.

    The weights are buffers filled by a logistic regression (model/bow.py), so the exported graph
    carries a linear text classifier beside the encoder. Pad tokens are never counted.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("idf", torch.zeros(cfg.vocab_size))  # 0: a token not in the vocabulary
        self.register_buffer("weight", torch.zeros(cfg.vocab_size, cfg.num_labels))
        self.register_buffer("bias", torch.zeros(cfg.num_labels))

    def forward(self, input_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B = input_ids.shape[0]
        counts = torch.zeros(B, self.idf.shape[0], dtype=self.idf.dtype, device=input_ids.device)
        counts = counts.scatter_add(1, input_ids, keep.to(counts.dtype))  # (B, V)
        tf = torch.where(counts > 0, 1.0 + torch.log(counts.clamp(min=1.0)), 0.0)
        x = tf * self.idf
        x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=1e-12)
        return x @ self.weight + self.bias  # (B, num_labels)


def _num_projections(cfg: ModelConfig) -> int:
    if cfg.attention == "full" or cfg.projection == "pooled":
        return 0
    return {"none": 2 * cfg.n_layers, "kv": cfg.n_layers, "layerwise": 1}[cfg.sharing]


class LinformerClassifier(nn.Module):
    """Token + position embeddings -> Linformer blocks -> masked pooling -> logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.n_max, cfg.d_model)
        # BERT normalises the embeddings; a pre-norm stack normalises at the end instead.
        post = cfg.norm == "post"
        self.emb_ln = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if post else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = nn.Identity() if post else nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        pooled_dim = cfg.d_model * (2 if cfg.pooling == "mean_max" else 1)
        self.head = nn.Linear(pooled_dim, cfg.num_labels)
        self.bow = BagOfWords(cfg) if cfg.bow else None
        # Sequence-axis projections, shared per cfg.sharing. Held here and handed to each layer
        # rather than registered in several modules, so checkpoints store each tensor once.
        n_proj = _num_projections(cfg)
        self.proj = nn.ParameterList(
            [nn.Parameter(torch.empty(cfg.n_max, cfg.k)) for _ in range(n_proj)]
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        # Unit-variance entries: with the 1/sqrt(L) scale, projected keys keep the keys' scale.
        for p in self.proj:
            nn.init.normal_(p, std=1.0)

    def projections(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, F) used by a layer under the configured sharing (learned projections)."""
        if self.cfg.sharing == "layerwise":
            return self.proj[0], self.proj[0]
        if self.cfg.sharing == "kv":
            return self.proj[layer], self.proj[layer]
        return self.proj[2 * layer], self.proj[2 * layer + 1]

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states (B, T, C) and the keep mask (B, T) bool; pad rows are garbage."""
        T = input_ids.shape[1]
        if not (torch.compiler.is_exporting() or torch.jit.is_tracing()) and self.cfg.n_max < T:
            raise SequenceTooLongError(
                f"input has {T} tokens but this model accepts at most n_max={self.cfg.n_max}; "
                "chunk or truncate it first"
            )
        keep = attention_mask.bool()  # (B, T)
        pos = torch.arange(T, device=input_ids.device)
        x = self.drop(self.emb_ln(self.tok_emb(input_ids) + self.pos_emb(pos)))  # (B, T, C)
        lengths = keep.sum(dim=-1, keepdim=True).clamp(min=1)  # (B, 1)
        scale = lengths.to(x.dtype).rsqrt().unsqueeze(-1)  # (B, 1, 1)
        no_bias = torch.zeros(1, 1, 1, 1, dtype=x.dtype, device=x.device)
        pooled = None
        if self.cfg.attention == "linformer" and self.cfg.projection == "pooled":
            pool, bias = segment_pooling(keep, self.cfg.k)
            pool = pool.to(x.dtype)
            pooled = SequenceProjection(pool, pool, scale, bias.to(x.dtype))
        for i, block in enumerate(self.blocks):
            if pooled is not None:
                proj = pooled
            elif self.cfg.attention == "full":
                proj = SequenceProjection(scale, scale, scale, no_bias)  # unused by full attention
            else:
                E, F_ = self.projections(i)
                proj = SequenceProjection(E, F_, scale, no_bias)
            x = block(x, keep, proj)
        return self.ln_f(x), keep

    def pool(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, C) or (B, 2C): masked mean, and with "mean_max" the masked max too."""
        keep3 = keep.unsqueeze(-1)  # (B, T, 1)
        lengths = keep3.sum(dim=1).clamp(min=1).to(x.dtype)  # (B, 1)
        # Pad positions carry garbage and must not reach the pooled vector.
        mean = torch.where(keep3, x, 0.0).sum(dim=1) / lengths
        if self.cfg.pooling == "mean":
            return mean
        # The lowest finite value rather than -inf: an all-pad row (never served) stays finite.
        low = torch.finfo(x.dtype).min
        return torch.cat([mean, torch.where(keep3, x, low).amax(dim=1)], dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: (B, T), right-padded; returns logits (B, num_labels)."""
        x, keep = self.encode(input_ids, attention_mask)
        logits = self.head(self.pool(x, keep))  # (B, num_labels)
        if self.bow is not None:
            logits = logits + self.bow(input_ids, keep)
        return logits

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
