"""Shared fixtures: a tiny real dataset, training run and exported artifact, built in seconds by the
project's own data, training, evaluation and export code from the committed corpus sample.
"""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
SAMPLE_TARBALL = FIXTURES / "spamassassin-sample.tgz"

# Small enough to train in a few seconds on two cores; n_max small so chunking is easy to reach.
TINY_MODEL = {
    "n_max": 64,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 2,
    "d_ff": 64,
    "k": 16,
    "dropout": 0.0,
}
TINY_TRAIN = {
    "epochs": 8,
    "vocab_size": 600,
    "max_tokens": 2048,
    "min_docs_per_step": 8,  # about 10 steps an epoch on the 85 training messages
    "warmup_steps": 5,
    "lr": 3e-3,
    "seed": 7,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests where ONNX Runtime cannot really use CUDA."""
    if not any("gpu" in item.keywords for item in items):
        return
    try:
        import onnxruntime as ort

        have_cuda = "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_loads()
    except ImportError:
        have_cuda = False
    if not have_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device usable by ONNX Runtime")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def _cuda_loads() -> bool:
    import ctypes

    for lib in ("libcublasLt.so.13", "libcudnn.so.9"):
        try:
            ctypes.CDLL(lib)
        except OSError:
            return False
    return True


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed corpus sample, parsed and split like the real corpus."""
    from model.corpus import build_spamassassin

    out = tmp_path_factory.mktemp("tiny-data")
    build_spamassassin(out, SAMPLE_TARBALL, out / "cache")
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training run of a tiny Linformer on the sample (best/ and last/ checkpoints, tokenizer)."""
    from model.config import ModelConfig
    from model.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny-run")
    train(tiny_data, out, ModelConfig(**TINY_MODEL), TrainConfig(**TINY_TRAIN), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_artifact(
    tiny_run: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A servable model directory: config.json, tokenizer.json, model.onnx, model.int8.onnx,
    model.fp16.onnx, the checkpoint, metrics and a model card. Treat it as read-only."""
    from export.onnx_export import export_artifact
    from model.evaluate import evaluate

    out = tmp_path_factory.mktemp("tiny-artifact") / "tiny-linformer"
    evaluate(tiny_run, tiny_data, out, "tiny-linformer")
    export_artifact(out, calibration_data=tiny_data)
    return out
