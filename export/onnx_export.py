"""Checkpoint -> ONNX: fp32 (graph-optimised by ONNX Runtime), int8 (dynamic quantization, CPU)
and fp16 (CUDA), with inputs input_ids / attention_mask [batch, length] and output logits.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from model.card import write_card
from model.checkpoint import CONFIG, WEIGHTS, CheckpointError, load_checkpoint
from model.linformer import LinformerClassifier
from service.artifact import (
    CONFIG_FILE,
    EXPORT_FILE,
    INPUT_NAMES,
    METRICS_FILE,
    MODEL_FILES,
    OUTPUT_NAME,
    TOKENIZER_FILE,
    ArtifactConfig,
    ArtifactError,
    pad_batch,
)

DEFAULT_OPSET = 20
# Kept in fp32 in the fp16 graph: normalisation, softmax and the reductions of the masked mean
# would lose range or precision in half precision over thousands of tokens.
FP16_KEEP_FP32 = [
    # The bag-of-words counts: ONNX Runtime's CPU scatter-add has no fp16 kernel.
    "ScatterElements",
    "Log",
    "ReduceL2",
    "LayerNormalization",
    "Softmax",
    "ReduceSum",
    "ReduceMean",
    "Sqrt",
    "Reciprocal",
    "Pow",
    "Div",
    "CumSum",
    "Erf",
]


class ExportError(Exception):
    """A problem with the inputs of an export, explained for the user."""


def check_artifact_inputs(artifact_dir: Path, ckpt_dir: Path) -> LinformerClassifier:
    """Load the checkpoint and check the tokenizer and service config agree with it."""
    for f in (TOKENIZER_FILE, CONFIG_FILE):
        if not (artifact_dir / f).exists():
            raise ExportError(
                f"{artifact_dir / f} does not exist; run linmod-eval to write the artifact first"
            )
    try:
        model = load_checkpoint(ckpt_dir)
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    try:
        cfg = ArtifactConfig.from_dir(artifact_dir)
    except ArtifactError as e:
        raise ExportError(str(e)) from e
    mc = model.cfg
    for key in ("n_max", "labels", "vocab_size", "k", "pad_id"):
        if cfg.get(key) != getattr(mc, key):
            raise ExportError(
                f"{CONFIG_FILE} says {key}={cfg.get(key)!r} but the checkpoint has {getattr(mc, key)!r}; "
                "the config and checkpoint come from different runs"
            )
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(artifact_dir / TOKENIZER_FILE))
    except Exception as e:  # tokenizers raises a bare Exception for unreadable files
        raise ExportError(f"cannot read {artifact_dir / TOKENIZER_FILE}: {e}") from e
    if tok.get_vocab_size() != mc.vocab_size:
        raise ExportError(
            f"{TOKENIZER_FILE} has {tok.get_vocab_size()} tokens but the model embeds {mc.vocab_size}; "
            "they come from different runs"
        )
    return model


def strip_node_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node debug metadata (Python stack traces with the exporting
    machine's file paths, module scopes); nothing at run time reads it."""
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        for node in g.node:
            del node.metadata_props[:]
            graphs += [a.g for a in node.attribute if a.HasField("g")]
            graphs += [sub for a in node.attribute for sub in a.graphs]
    for fn in model.functions:
        for node in fn.node:
            del node.metadata_props[:]


def export_fp32(model: LinformerClassifier, out: Path, opset: int) -> None:
    """torch.export-based ONNX export with batch and length dynamic (length up to n_max)."""
    if opset > onnx.defs.onnx_opset_version():
        raise ExportError(
            f"opset {opset} is newer than ONNX {onnx.__version__} knows "
            f"(at most {onnx.defs.onnx_opset_version()}); use --opset {DEFAULT_OPSET}"
        )
    n_max = model.cfg.n_max
    # Example shapes avoid 0/1 so the exporter does not specialise on them.
    ids = torch.randint(1, model.cfg.vocab_size, (2, min(16, n_max)))
    mask = torch.ones_like(ids)
    batch = torch.export.Dim("batch", min=1, max=4096)
    length = torch.export.Dim("length", min=1, max=n_max)
    dyn = {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}}
    try:
        torch.onnx.export(
            model.eval(),
            (ids, mask),
            str(out),
            dynamo=True,
            opset_version=opset,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_shapes=dyn,
            optimize=True,
            verbose=False,
            external_data=False,
        )
    except Exception as e:  # the exporter raises many error types; all mean the same to a user
        raise ExportError(f"ONNX export at opset {opset} failed: {str(e).splitlines()[0]}") from e
    exported = onnx.load(str(out))
    strip_node_metadata(exported)
    onnx.save(exported, str(out))
    # When it cannot convert, the exporter keeps its own opset and only warns; say so instead.
    got = next(o.version for o in exported.opset_import if o.domain in ("", "ai.onnx"))
    if got != opset:
        raise ExportError(
            f"the exporter could not produce opset {opset} (it fell back to {got}); "
            f"use --opset {DEFAULT_OPSET} or another opset ONNX Runtime {ort.__version__} supports"
        )


def ort_optimize(src: Path, dst: Path) -> None:
    """ONNX Runtime's basic (provider-independent) graph optimisations, saved offline."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    try:
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        opset = next(
            (
                o.version
                for o in onnx.load(str(src), load_external_data=False).opset_import
                if o.domain in ("", "ai.onnx")
            ),
            "?",
        )
        raise ExportError(
            f"ONNX Runtime {ort.__version__} cannot load the exported graph (opset {opset}); "
            f"choose an opset it supports with --opset. It said: {str(e).splitlines()[0]}"
        ) from e
    # The optimiser leaves intermediate shape annotations from the trace's example shapes; they
    # are optional and would contradict shape inference at other shapes, so drop them.
    m = onnx.load(str(dst))
    del m.graph.value_info[:]
    onnx.save(m, str(dst))


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul/Gemm nodes with a constant (weight) operand; attention's activation products stay fp32.

    The bag-of-words layer stays fp32 too: its input is a sparse TF-IDF vector of small values
    that one uint8 scale per tensor would flatten, and it costs little.
    """
    init = {i.name for i in model.graph.initializer}
    return [
        n.name
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm")
        and any(i in init for i in n.input)
        and not any(i.startswith("bow.") for i in n.input)
    ]


def quantize_int8(
    src: Path,
    dst: Path,
    calibration: Sequence[Sequence[int]] | None,
    pad_id: int = 0,
    method: str = "minmax",
) -> str:
    """int8 weights (per channel) for CPUs with VNNI; returns a description of the scheme.

    With calibration documents the activation scales are fixed (static QDQ), so each row is
    quantized alone and a document's result does not depend on its batch. Without them, dynamic
    quantization computes one activation scale over the whole batch tensor: faster to produce,
    but a document's scores then move slightly with its neighbours.
    """
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        nodes = weight_matmuls(onnx.load(str(pre)))
        if calibration is None:
            q.quantize_dynamic(
                str(pre),
                str(dst),
                weight_type=q.QuantType.QInt8,
                per_channel=True,
                nodes_to_quantize=nodes,
            )
            return "int8 dynamic (per-channel weights; activation scale per batch)"
        if not calibration:
            raise ExportError("static int8 quantization needs at least one calibration document")
        methods = {
            "minmax": q.CalibrationMethod.MinMax,
            "percentile": q.CalibrationMethod.Percentile,
            "entropy": q.CalibrationMethod.Entropy,
        }
        if method not in methods:
            raise ExportError(
                f"calibration method must be one of {', '.join(methods)}, not {method!r}"
            )

        class Reader(q.CalibrationDataReader):
            def __init__(self) -> None:
                self.docs = iter(calibration or [])

            def get_next(self) -> dict[str, np.ndarray] | None:
                doc = next(self.docs, None)
                if doc is None:
                    return None
                return dict(zip(INPUT_NAMES, pad_batch([doc], pad_id), strict=True))

        q.quantize_static(
            str(pre),
            str(dst),
            Reader(),
            quant_format=q.QuantFormat.QDQ,
            per_channel=True,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            nodes_to_quantize=nodes,
            calibrate_method=methods[method],
        )
    return f"int8 static (per-channel weights; activation scales calibrated, {method}, on {len(calibration)} training documents)"


def calibration_documents(
    artifact_dir: Path, data_dir: Path, n_max: int, count: int, seed: int = 0
) -> list[list[int]]:
    """A seeded sample of training-split documents, tokenized and cut to n_max."""
    import random

    from model.data import DataError, read_split
    from model.tokenizer import encode, load_tokenizer

    try:
        train = read_split(data_dir, "train")
    except DataError as e:
        raise ExportError(f"calibration data: {e}") from e
    sample = random.Random(seed).sample(train, min(count, len(train)))
    tok = load_tokenizer(artifact_dir / TOKENIZER_FILE)
    return [ids[:n_max] for ids in encode(tok, [e.text for e in sample]) if ids]


def unshare_initializers(model: onnx.ModelProto) -> None:
    """Give every node its own copy of an initializer several nodes read.

    ONNX Runtime's optimiser merges equal constants (all-zero biases, for one); when such a
    tensor feeds a node kept in fp32 and one turned fp16, one tensor cannot be both types.
    """
    inits = {i.name: i for i in model.graph.initializer}
    seen: set[str] = set()
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name not in inits:
                continue
            if name in seen:
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[name])
                copy.name = f"{name}__{node.name or k}_{len(model.graph.initializer)}"
                model.graph.initializer.append(copy)
                node.input[k] = copy.name
            else:
                seen.add(name)


def convert_fp16(src: Path, dst: Path) -> None:
    from onnxconverter_common import float16

    m = onnx.load(str(src))
    unshare_initializers(m)
    # Casts stay as they are: the converter retypes a Cast's output without changing its `to`,
    # which makes an invalid graph when the Cast feeds fp32-only nodes (the length reciprocal).
    casts = [n.name for n in m.graph.node if n.op_type == "Cast"]
    # The bag-of-words layer reads a sparse TF-IDF vector of small values: fp32 throughout.
    casts += [n.name for n in m.graph.node if any(i.startswith("bow.") for i in n.input)]
    # The converter warns once per weight too small for fp16 (clamped to +-1e-7): one line
    # with the count says the same.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        m16 = float16.convert_float_to_float16(
            m, keep_io_types=True, op_block_list=FP16_KEEP_FP32, node_block_list=casts
        )
    clamped = sum("will be truncated" in str(w.message) for w in caught)
    for w in caught:
        if "will be truncated" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if clamped:
        print(f"fp16: {clamped} weights below fp16's smallest magnitude were clamped to +-1e-7")
    onnx.save(m16, str(dst))


def export_artifact(
    artifact_dir: Path,
    checkpoint_dir: Path | None = None,
    opset: int = DEFAULT_OPSET,
    fp16: bool = True,
    calibration_data: Path | None = None,
    calibration_docs: int = 256,
    calibration_method: str = "minmax",
) -> dict[str, Any]:
    """Write model.onnx, model.int8.onnx (and model.fp16.onnx) plus export.json into artifact_dir.

    With calibration_data (a dataset directory) the int8 file is statically quantized and batch
    invariant; without it, dynamically quantized.
    """
    ckpt = checkpoint_dir or artifact_dir
    model = check_artifact_inputs(artifact_dir, ckpt)
    calibration = None
    if calibration_data is not None:
        calibration = calibration_documents(
            artifact_dir, calibration_data, model.cfg.n_max, calibration_docs
        )
    files = []
    fp32, int8 = MODEL_FILES["fp32"], MODEL_FILES["int8"]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        export_fp32(model, raw, opset)
        ort_optimize(raw, artifact_dir / fp32)
    files.append((fp32, "fp32"))
    scheme = quantize_int8(
        artifact_dir / fp32,
        artifact_dir / int8,
        calibration,
        model.cfg.pad_id,
        calibration_method,
    )
    files.append((int8, scheme))
    if fp16:
        convert_fp16(artifact_dir / fp32, artifact_dir / MODEL_FILES["fp16"])
        files.append((MODEL_FILES["fp16"], "fp16 (normalisation, softmax, reductions in fp32)"))
    record = {
        "checkpoint": WEIGHTS if ckpt == artifact_dir else str(ckpt / WEIGHTS),
        "opset": opset,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "seconds": round(time.time() - t0, 1),
        "files": [
            {"file": f, "precision": p, "bytes": (artifact_dir / f).stat().st_size}
            for f, p in files
        ],
    }
    (artifact_dir / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if (artifact_dir / METRICS_FILE).exists():
        write_card(artifact_dir)
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="linmod-export", description=__doc__)
    p.add_argument(
        "--artifact", type=Path, required=True, help="artifact directory (from linmod-eval)"
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        help=f"directory with {WEIGHTS} + {CONFIG} (default: the artifact)",
    )
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--no-fp16", action="store_true", help="skip model.fp16.onnx")
    p.add_argument(
        "--data",
        type=Path,
        help="dataset directory whose training split calibrates static int8 quantization "
        "(batch-invariant); without it int8 is dynamic",
    )
    p.add_argument("--calibration-docs", type=int, default=256)
    p.add_argument(
        "--calibration-method", choices=["minmax", "percentile", "entropy"], default="minmax"
    )
    args = p.parse_args(argv)
    if not args.artifact.is_dir():
        print(f"linmod-export: error: {args.artifact} is not a directory", file=sys.stderr)
        return 2
    try:
        rec = export_artifact(
            args.artifact,
            args.checkpoint,
            args.opset,
            fp16=not args.no_fp16,
            calibration_data=args.data,
            calibration_docs=args.calibration_docs,
            calibration_method=args.calibration_method,
        )
    except ExportError as e:
        print(f"linmod-export: error: {e}", file=sys.stderr)
        return 2
    for f in rec["files"]:
        print(f"{f['file']:>18}  {f['bytes'] / 2**20:7.1f} MiB  {f['precision']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
