"""A naive server to compare the service with: FastAPI, one ONNX Runtime run per request, run in
FastAPI's thread pool, with the same model, precision, tokenizer and head truncation to n_max.
No queue, no batching, no limits: what one writes first.

    python -m bench.naive_server --model-dir DIR --port 8100 [--precision int8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastapi import FastAPI
from pydantic import BaseModel

from bench.common import DEFAULT_MODEL_DIR
from service.artifact import (
    INPUT_NAMES,
    MODEL_FILES,
    OUTPUT_NAME,
    TOKENIZER_FILE,
    ArtifactConfig,
    pad_batch,
    softmax,
)


class NaiveRequest(BaseModel):
    input: str | list[str]
    long_document: str | None = None  # accepted for the load generator; always the head


def create_app(model_dir: Path, precision: str = "int8", threads: int = 0) -> FastAPI:
    """The app, with its tokenizer and ONNX Runtime session loaded."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    config = ArtifactConfig.from_dir(model_dir)
    n_max, pad_id, threshold = config.n_max, config.pad_id, config.threshold
    labels, flags = config.labels, config.flag_indices
    tok = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
    tok.no_truncation()
    tok.no_padding()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(
        str(model_dir / MODEL_FILES[precision]), so, providers=["CPUExecutionProvider"]
    )
    app = FastAPI(title="naive")

    @app.get("/ready")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    # A plain `def`: FastAPI runs it in its thread pool, so requests run the model concurrently.
    @app.post("/v1/classify")
    def classify(body: NaiveRequest) -> dict[str, object]:
        texts = [body.input] if isinstance(body.input, str) else body.input
        results = []
        for text in texts:
            full = tok.encode(text, add_special_tokens=False).ids
            feeds = dict(
                zip(INPUT_NAMES, pad_batch([full[:n_max] or [pad_id]], pad_id), strict=True)
            )
            (logits,) = sess.run([OUTPUT_NAME], feeds)
            probs = softmax(logits)[0]
            best = int(probs.argmax())
            results.append(
                {
                    "label": labels[best],
                    "score": float(probs[best]),
                    "flagged": bool(probs[flags].max() >= threshold),
                    "tokens": len(full),
                    "truncated": len(full) > n_max,
                }
            )
        return {"results": results}

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.naive_server", description=__doc__)
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--precision", choices=sorted(MODEL_FILES), default="int8")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: auto)")
    args = p.parse_args(argv)
    import uvicorn

    app = create_app(args.model_dir, args.precision, args.threads)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
