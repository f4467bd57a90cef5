"""OnnxEngine over a hand-built ONNX graph: provider and precision choice, CUDA checks, warm-up."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.engine import EngineError, OnnxEngine, choose_precision, warmup, warmup_shapes

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

VOCAB, DIM, LABELS = 50, 8, 3


def masked_mean_classifier(path: Path) -> None:
    """Embedding, masked mean pooling, linear head: batch-invariant like the real model."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(VOCAB, DIM)).astype(np.float32), "emb"),
        numpy_helper.from_array(rng.normal(size=(DIM, LABELS)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h"]),  # (B, T, D)
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axis2"], ["m3"]),  # (B, T, 1)
        helper.make_node("Mul", ["h", "m3"], ["hm"]),
        helper.make_node("ReduceSum", ["hm", "axis1"], ["total"], keepdims=0),  # (B, D)
        helper.make_node("ReduceSum", ["m3", "axis1"], ["count"], keepdims=0),  # (B, 1)
        helper.make_node("Div", ["total", "count"], ["pooled"]),
        helper.make_node("MatMul", ["pooled", "w"], ["logits"]),  # (B, C)
    ]
    dims = ["batch", "length"]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, dims),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", LABELS])],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx-model")
    config = {
        "name": "tiny", "version": "1", "labels": ["ok", "spam", "abuse"],
        "flag_labels": ["spam", "abuse"], "threshold": 0.5, "n_max": 16, "pad_id": 0,
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    masked_mean_classifier(path / "model.onnx")
    return path


def test_cpu_engine_runs_and_is_batch_invariant(model_dir: Path) -> None:
    engine = OnnxEngine.load(model_dir, device="cpu", precision="fp32")
    assert engine.provider == "CPUExecutionProvider" and engine.precision == "fp32"
    ids = np.array([[5, 6, 7, 0, 0, 0], [1, 2, 3, 4, 5, 6]], dtype=np.int64)
    mask = (np.arange(6) < np.array([[3], [6]])).astype(np.int64)
    batched = engine.run(ids, mask)
    alone = engine.run(ids[:1, :3], mask[:1, :3])
    assert batched.dtype == np.float32 and batched.shape == (2, 3)
    np.testing.assert_allclose(batched[0], alone[0], atol=1e-5)


def test_auto_precision_prefers_int8_on_cpu(model_dir: Path, tmp_path: Path) -> None:
    assert choose_precision("auto", False, model_dir) == "fp32"
    assert choose_precision("auto", True, model_dir) == "fp32"
    for name in ("config.json", "model.onnx"):
        shutil.copy(model_dir / name, tmp_path / name)
    shutil.copy(model_dir / "model.onnx", tmp_path / "model.int8.onnx")
    shutil.copy(model_dir / "model.onnx", tmp_path / "model.fp16.onnx")
    assert choose_precision("auto", False, tmp_path) == "int8"
    assert choose_precision("auto", True, tmp_path) == "fp16"
    assert OnnxEngine.load(tmp_path, device="cpu").precision == "int8"
    with pytest.raises(EngineError, match=r"model\.fp16\.onnx missing"):
        choose_precision("fp16", True, model_dir)


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="this onnxruntime build has no CUDA provider",
)
def test_cuda_is_checked_after_the_session_exists(model_dir: Path) -> None:
    probe = ort.InferenceSession(
        str(model_dir / "model.onnx"), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    if "CUDAExecutionProvider" in probe.get_providers():
        engine = OnnxEngine.load(model_dir, device="cuda")
        assert engine.provider == "CUDAExecutionProvider"
        return
    # CUDA libraries missing: the provider is listed but the session quietly runs on CPU.
    with pytest.raises(EngineError, match="could not use CUDA"):
        OnnxEngine.load(model_dir, device="cuda")
    fallback = OnnxEngine.load(model_dir, device="auto")
    assert fallback.provider == "CPUExecutionProvider"


def test_bad_artifacts_fail_clearly(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"config\.json"):
        OnnxEngine.load(tmp_path)
    shutil.copy(model_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(EngineError, match="cannot load"):
        OnnxEngine.load(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"name": "x", "version": "1",
        "labels": ["a", "b"], "flag_labels": ["c"], "n_max": 8}))  # fmt: skip
    with pytest.raises(EngineError, match="flag_labels not in labels"):
        OnnxEngine.load(tmp_path)


def test_warmup_covers_short_long_and_full_batches(model_dir: Path) -> None:
    shapes = warmup_shapes(n_max=4096, max_batch_tokens=16384, max_batch_size=32)
    assert shapes == [(1, 16), (1, 4096), (4, 4096), (32, 64)]
    engine = OnnxEngine.load(model_dir, device="cpu")
    assert warmup(engine, warmup_shapes(16, 64, 8)) >= 0


def test_warmup_warms_the_session_for_runs_alone_too(model_dir: Path) -> None:
    engine = OnnxEngine.load(model_dir, device="cpu", workers=2, intra_op_threads=1)
    assert engine.solo_session  # two one-thread runs at once, and one on both threads alone
    calls: list[tuple[tuple[int, int], bool]] = []
    run = engine.run

    def recorded(ids: np.ndarray, mask: np.ndarray, solo: bool = False) -> np.ndarray:
        calls.append((ids.shape, solo))
        return run(ids, mask, solo)

    engine.run = recorded  # type: ignore[method-assign]
    shapes = warmup_shapes(16, 64, 8)
    warmup(engine, shapes)
    assert calls == [(shape, solo) for shape in shapes for solo in (False, True)]
    alone = OnnxEngine.load(model_dir, device="cpu", workers=1)
    assert not alone.solo_session  # one session: warmed once


def test_cpu_split_shares_the_cores() -> None:
    from service.engine import cpu_split

    cores = len(os.sched_getaffinity(0))
    assert cpu_split(0, 0) == (cores, 1)  # a run per core, one thread each
    assert cpu_split(1, 0) == (1, cores)
    assert cpu_split(0, cores) == (1, cores)
    assert cpu_split(3, 2) == (3, 2)


def test_solo_and_concurrent_sessions_agree(model_dir: Path) -> None:
    engine = OnnxEngine.load(model_dir, device="cpu", precision="fp32", workers=2)
    assert engine.workers == 2
    ids = np.array([[5, 6, 7, 0], [1, 2, 3, 4]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda _: engine.run(ids, mask), range(8)))
    solo = engine.run(ids, mask, solo=True)
    for logits in together:
        np.testing.assert_allclose(logits, solo, atol=1e-5)


def test_per_core_sessions_never_spin_and_the_solo_one_spins_only_within_a_run(
    model_dir: Path,
) -> None:
    engine = OnnxEngine.load(
        model_dir, device="cpu", precision="fp32", workers=2, intra_op_threads=1
    )
    assert engine.workers == 2

    def config(session: object) -> tuple[str, str]:
        options = session.get_session_options()  # type: ignore[attr-defined]
        keys = ("session.intra_op.allow_spinning", "session.force_spinning_stop")
        return tuple(options.get_session_config_entry(k) for k in keys)  # type: ignore[return-value]

    # Narrow runs leave the cores to the event loop between runs; the all-core session for a
    # run alone spins between its parallel sections and stops once the run returns.
    assert config(engine._session) == ("0", "0")
    assert config(engine._wide) == ("1", "1")
    ids, mask = np.array([[5, 6, 7]], dtype=np.int64), np.ones((1, 3), dtype=np.int64)
    np.testing.assert_allclose(engine.run(ids, mask, solo=True), engine.run(ids, mask), atol=1e-5)
