"""A servable artifact with random weights at the shipped sizes, for running the benchmarks before
(or without) a trained model: tokenizer trained on the training split, checkpoint, config.json in
the service's format, and ONNX files from the project's own export code.

    python -m bench.random_artifact --out /tmp/random-linformer
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.common import DEFAULT_DATA_DIR
from service.artifact import MODEL_KEYS, TOKENIZER_FILE, ArtifactConfig, ship


def build(
    out: Path,
    data: Path,
    n_max: int = 4096,
    k: int = 128,
    vocab_size: int = 16000,
    calibration_docs: int = 64,
    fp16: bool = True,
    seed: int = 0,
) -> Path:
    """Write the artifact into `out` and return it."""
    import torch

    from export.onnx_export import export_artifact
    from model.checkpoint import code_version, save_checkpoint
    from model.config import ModelConfig
    from model.data import read_split
    from model.linformer import LinformerClassifier
    from model.tokenizer import train_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer((e.text for e in read_split(data, "train")), vocab_size=vocab_size)
    tok.save(str(out / TOKENIZER_FILE))
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), n_max=n_max, k=k, dropout=0.0)
    model = LinformerClassifier(cfg).eval()
    # Fresh biases are all zero and norms all one; the exporter then shares equal initializers
    # between nodes, which a trained model never has. A little noise keeps every tensor distinct.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    save_checkpoint(model, out)
    config = ArtifactConfig(
        name=out.name,
        version=time.strftime("%Y.%m.%d"),
        architecture="linformer",
        labels=cfg.labels,
        flag_labels=["spam"],
        threshold=0.5,
        threshold_rule="fixed 0.5 (random weights, not a trained model)",
        **{key: getattr(cfg, key) for key in MODEL_KEYS},
        data={"source": "random weights", "sha256": None},
        code_version=code_version(),
    )
    ship(out, out / TOKENIZER_FILE, out, config)
    export_artifact(out, calibration_data=data, calibration_docs=calibration_docs, fp16=fp16)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.random_artifact", description=__doc__)
    p.add_argument("--out", type=Path, required=True, help="artifact directory to write")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--n-max", type=int, default=4096)
    p.add_argument("--k", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=16000)
    p.add_argument("--calibration-docs", type=int, default=64)
    p.add_argument("--no-fp16", action="store_true")
    args = p.parse_args(argv)
    t0 = time.time()
    build(
        args.out,
        args.data,
        n_max=args.n_max,
        k=args.k,
        vocab_size=args.vocab_size,
        calibration_docs=args.calibration_docs,
        fp16=not args.no_fp16,
    )
    print(f"random-weight artifact in {args.out} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
