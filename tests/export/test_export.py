"""Export of a tiny trained model: graph contract, dynamic shapes, parity, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.onnx_export import ExportError, export_artifact, main
from export.parity import main as parity_main
from export.parity import run_parity, session_inputs
from model.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


def test_graph_has_the_serving_contract(tiny_artifact: Path) -> None:
    m = onnx.load(str(tiny_artifact / "model.onnx"))
    inputs = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in m.graph.input
    }
    assert inputs == {"input_ids": ["batch", "length"], "attention_mask": ["batch", "length"]}
    out = m.graph.output[0]
    assert out.name == "logits"
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    opset = {o.domain: o.version for o in m.opset_import}
    assert opset[""] >= 18
    # The E/F slice to the batch length survived export: no shape was baked in.
    assert any(n.op_type == "Slice" for n in m.graph.node)
    for name in ("model.int8.onnx", "model.fp16.onnx"):
        q = onnx.load(str(tiny_artifact / name))
        assert [i.name for i in q.graph.input] == ["input_ids", "attention_mask"]
        assert q.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # Static int8: fixed-scale QuantizeLinear/DequantizeLinear pairs around int8 weights.
    q8 = onnx.load(str(tiny_artifact / "model.int8.onnx"))
    ops = {n.op_type for n in q8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "DynamicQuantizeLinear" not in ops
    assert any(i.data_type == onnx.TensorProto.INT8 for i in q8.graph.initializer)


def test_onnx_files_carry_no_exporter_stack_traces(tiny_artifact: Path) -> None:
    """The exporter annotates nodes with Python stack traces naming the exporting machine's
    files; the shipped graphs must not carry them."""
    here = str(Path(__file__).resolve().parents[2])
    for name in ("model.onnx", "model.int8.onnx", "model.fp16.onnx"):
        raw = (tiny_artifact / name).read_bytes()
        assert here.encode() not in raw and b"stack_trace" not in raw, name
        m = onnx.load(str(tiny_artifact / name))
        assert not any(n.metadata_props for n in m.graph.node), name


def test_graph_stays_dynamic_at_shapes_never_traced(tiny_artifact: Path) -> None:
    model = load_checkpoint(tiny_artifact)
    sess = ort.InferenceSession(
        str(tiny_artifact / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(3)
    n_max = model.cfg.n_max
    for B, T in [(1, 1), (1, n_max), (4, 3), (7, n_max - 5), (33, 17)]:
        seqs = [
            list(rng.integers(2, model.cfg.vocab_size, size=rng.integers(1, T + 1)))
            for _ in range(B)
        ]
        seqs[-1] = list(rng.integers(2, model.cfg.vocab_size, size=T))
        feed = session_inputs(seqs, model.cfg.pad_id)
        onnx_out = sess.run(["logits"], feed)[0]
        with torch.no_grad():
            torch_out = model(
                torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"])
            ).numpy()
        assert onnx_out.shape == (B, model.cfg.num_labels)
        np.testing.assert_allclose(onnx_out, torch_out, atol=1e-4, rtol=0)


def test_parity_command_passes_and_writes_its_report(
    tiny_artifact: Path, tiny_data: Path, tmp_path: Path
) -> None:
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    report = run_parity(art, tiny_data)
    assert report["passed"], report
    names = [c["name"] for c in report["checks"]]
    assert any("fp32" in n for n in names) and any("int8" in n for n in names)
    assert any("padding invariance" in n for n in names) and any("dynamic" in n for n in names)
    assert json.loads((art / "parity.json").read_text())["passed"] is True
    assert "## Parity" in (art / "MODEL_CARD.md").read_text()
    assert parity_main(["--artifact", str(art), "--data", str(tiny_data)]) == 0


def test_parity_fails_loudly_when_the_graph_does_not_match(
    tiny_artifact: Path, tiny_data: Path, tmp_path: Path
) -> None:
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    # Perturb the checkpoint after export: the ONNX files no longer compute the same function.
    from safetensors.torch import load_file, save_file

    state = load_file(str(art / "model.safetensors"))
    state["head.bias"] = state["head.bias"] + torch.tensor([0.5, -0.5])
    save_file(state, str(art / "model.safetensors"))
    assert parity_main(["--artifact", str(art), "--data", str(tiny_data)]) == 1
    report = json.loads((art / "parity.json").read_text())
    assert not report["passed"]
    assert not next(c for c in report["checks"] if c["name"].startswith("fp32"))["passed"]


@pytest.fixture
def artifact_copy(tiny_artifact: Path, tmp_path: Path) -> Path:
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    for f in art.glob("*.onnx"):
        f.unlink()
    return art


def test_missing_checkpoint(artifact_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (artifact_copy / "model.safetensors").unlink()
    with pytest.raises(
        ExportError, match=r"checkpoint incomplete: .*model.safetensors does not exist"
    ):
        export_artifact(artifact_copy)
    assert main(["--artifact", str(artifact_copy)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("linmod-export: error:") and "Traceback" not in err


def test_checkpoint_that_does_not_match_its_config(artifact_copy: Path) -> None:
    cfg = json.loads((artifact_copy / "model_config.json").read_text())
    cfg["d_model"] *= 2
    (artifact_copy / "model_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match=r"does not match .*shape"):
        export_artifact(artifact_copy)


def test_service_config_from_another_run(artifact_copy: Path) -> None:
    cfg = json.loads((artifact_copy / "config.json").read_text())
    cfg["n_max"] = 4096
    (artifact_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match=r"config.json says n_max=4096 but the checkpoint has 64"):
        export_artifact(artifact_copy)


def test_missing_or_mismatched_tokenizer(artifact_copy: Path, tmp_path: Path) -> None:
    tok = artifact_copy / "tokenizer.json"
    saved = tok.read_text()
    tok.unlink()
    with pytest.raises(ExportError, match=r"tokenizer.json does not exist"):
        export_artifact(artifact_copy)
    from model.tokenizer import train_tokenizer

    train_tokenizer(["a few words", "to train on"], vocab_size=300).save(str(tok))
    with pytest.raises(ExportError, match=r"tokenizer.json has .* tokens but the model embeds"):
        export_artifact(artifact_copy)
    tok.write_text("{not json")
    with pytest.raises(ExportError, match=r"cannot read .*tokenizer.json"):
        export_artifact(artifact_copy)
    tok.write_text(saved)


def test_opsets_that_cannot_be_served_are_clear_errors(artifact_copy: Path) -> None:
    with pytest.raises(ExportError, match=r"opset 99 is newer than ONNX .* knows"):
        export_artifact(artifact_copy, opset=99)
    # ONNX knows opset 26 but the exporter cannot convert to it and ONNX Runtime could not load it.
    with pytest.raises(ExportError, match=r"could not produce opset 26 .*ONNX Runtime"):
        export_artifact(artifact_copy, opset=26)


def test_fp16_of_a_freshly_initialised_model_loads(tmp_path: Path) -> None:
    """All-zero biases merge into one shared constant; fp16 conversion must still be valid."""
    from export.onnx_export import convert_fp16, export_fp32, ort_optimize
    from model.config import ModelConfig
    from model.linformer import LinformerClassifier

    cfg = ModelConfig(vocab_size=300, n_max=32, d_model=16, n_layers=2, n_heads=2, d_ff=32, k=4)
    model = LinformerClassifier(cfg).eval()
    export_fp32(model, tmp_path / "raw.onnx", 20)
    ort_optimize(tmp_path / "raw.onnx", tmp_path / "model.onnx")
    convert_fp16(tmp_path / "model.onnx", tmp_path / "model.fp16.onnx")
    sess = ort.InferenceSession(
        str(tmp_path / "model.fp16.onnx"), providers=["CPUExecutionProvider"]
    )
    feed = session_inputs([[5, 6, 7, 8], [9, 10]], pad_id=0)
    with torch.no_grad():
        ref = model(torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"]))
    np.testing.assert_allclose(sess.run(["logits"], feed)[0], ref.numpy(), atol=1e-2)


@pytest.mark.slow
def test_converted_layout_with_bag_of_words_exports_and_matches(tmp_path: Path) -> None:
    """Post-norm, pooled projection and the TF-IDF branch: ONNX Runtime gives PyTorch's logits,
    and int8 leaves the bag-of-words layer in fp32."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from export.onnx_export import export_fp32, ort_optimize, quantize_int8
    from model.batching import collate
    from model.config import ModelConfig
    from model.linformer import LinformerClassifier

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=97, n_max=48, d_model=32, n_layers=2, n_heads=4, d_ff=48, k=8, dropout=0.0,
        norm="post", projection="pooled", qk_norm=False, bow=True,
    )  # fmt: skip
    model = LinformerClassifier(cfg).eval()
    assert model.bow is not None
    model.bow.idf.copy_(torch.rand(97))
    model.bow.weight.copy_(torch.randn(97, 2))
    export_fp32(model, tmp_path / "raw.onnx", 18)
    ort_optimize(tmp_path / "raw.onnx", tmp_path / "model.onnx")
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for docs in ([[3, 4, 5]], [[3, 4, 5], [1] * 30], [list(range(1, 45))]):
        ids, mask = collate(docs)
        want = model(ids, mask).detach().numpy()
        got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        assert np.abs(want - got).max() < 1e-4
    calibration = [list(range(1, 20)), [5, 6, 7, 8], list(range(30, 70))[:40]]
    quantize_int8(tmp_path / "model.onnx", tmp_path / "model.int8.onnx", calibration)
    q = onnx.load(str(tmp_path / "model.int8.onnx"))
    bow_inputs = [i for n in q.graph.node if n.op_type in ("MatMul", "Gemm") for i in n.input]
    assert "bow.weight" in bow_inputs  # the float weight itself, not a dequantized copy
