"""A model artifact: its file names, its config.json (`ArtifactConfig`), how its graph is fed
(right-padded ids and mask) and read (logits to probabilities and flag scores). Torch-free:
training, export, benchmarks and the service all go through it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float32]

CONFIG_FILE = "config.json"  # what the service reads: labels, threshold, n_max, sizes
TOKENIZER_FILE = "tokenizer.json"
MODEL_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}
WEIGHTS_FILE = "model.safetensors"  # the PyTorch checkpoint the ONNX files came from
MODEL_CONFIG_FILE = "model_config.json"  # that checkpoint's model/config.py ModelConfig
METRICS_FILE = "metrics.json"
TRAINING_FILE = "training.json"
EXPORT_FILE = "export.json"
PARITY_FILE = "parity.json"
CARD_FILE = "MODEL_CARD.md"

INPUT_NAMES = ("input_ids", "attention_mask")  # int64 [batch, length]
OUTPUT_NAME = "logits"  # float [batch, labels]

# The model sizes config.json carries beside labels and threshold (what export checks).
MODEL_KEYS = (
    "n_max",
    "pad_id",
    "k",
    "d_model",
    "n_layers",
    "n_heads",
    "d_ff",
    "sharing",
    "vocab_size",
)


class ArtifactError(ValueError):
    """An artifact file that is missing or does not say what it must."""


class ArtifactConfig(BaseModel):
    """config.json of a model artifact; unknown keys are kept (and shown on /info)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=(), frozen=True)

    name: str
    version: str
    labels: list[str] = Field(min_length=2)
    flag_labels: list[str] = Field(min_length=1)
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    n_max: int = Field(ge=1)
    pad_id: int = 0
    k: int | None = None

    @model_validator(mode="after")
    def _flag_labels_known(self) -> ArtifactConfig:
        unknown = set(self.flag_labels) - set(self.labels)
        if unknown:
            raise ValueError(f"flag_labels not in labels: {sorted(unknown)}")
        return self

    @classmethod
    def from_dir(cls, artifact_dir: Path) -> ArtifactConfig:
        """Read and validate `artifact_dir/config.json`."""
        path = artifact_dir / CONFIG_FILE
        try:
            return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"cannot read model config {path}: {exc}") from exc

    def write(self, artifact_dir: Path) -> Path:
        """Write `artifact_dir/config.json` (keys left unset are left out)."""
        path = artifact_dir / CONFIG_FILE
        path.write_text(json.dumps(self.model_dump(exclude_unset=True), indent=2) + "\n")
        return path

    def get(self, key: str, default: Any = None) -> Any:
        """A key of config.json, declared or extra."""
        return getattr(self, key, default)

    @property
    def flag_indices(self) -> list[int]:
        """Logit columns of the labels that flag a document."""
        return [self.labels.index(label) for label in self.flag_labels]


def ship(checkpoint_dir: Path, tokenizer: Path, artifact_dir: Path, config: ArtifactConfig) -> None:
    """Copy a checkpoint and its tokenizer into `artifact_dir` and write its config.json."""
    artifact_dir.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_FILE, MODEL_CONFIG_FILE):
        if checkpoint_dir.resolve() != artifact_dir.resolve():
            shutil.copyfile(checkpoint_dir / name, artifact_dir / name)
    if tokenizer.resolve() != (artifact_dir / TOKENIZER_FILE).resolve():
        shutil.copyfile(tokenizer, artifact_dir / TOKENIZER_FILE)
    config.write(artifact_dir)


def pad_batch(
    seqs: Sequence[Sequence[int] | IntArray], pad_id: int, length: int | None = None
) -> tuple[IntArray, IntArray]:
    """Right-padded (input_ids, attention_mask) [batch, length or the longest], as the graph
    expects: positions 0..L-1 of every row line up with the model's position embeddings."""
    longest = length or max(len(s) for s in seqs)
    ids = np.full((len(seqs), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), longest), dtype=np.int64)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return ids, mask


def softmax(logits: NDArray[Any]) -> FloatArray:
    """Row-wise softmax in float32."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    probs: FloatArray = (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)
    return probs


def flag_scores(probs: NDArray[Any], labels: list[str], flag_labels: list[str]) -> FloatArray:
    """A document's flag score: the highest probability among the flag labels."""
    cols = [labels.index(label) for label in flag_labels]
    scores: FloatArray = probs[:, cols].max(axis=1)
    return scores
