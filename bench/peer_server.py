"""A serving-framework peer for bench.load: LitServe or Ray Serve, each with its own dynamic
batching (32 requests, 10 ms), over the same ONNX model, precision, tokenizer and head truncation
as the service. It runs in the peers' own environment (`bench.peers`), never the service's, so it
imports nothing from this project.

    .venv-peers/bin/python bench/peer_server.py litserve --model-dir DIR --port 8200
"""

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

MAX_BATCH, BATCH_TIMEOUT_S = 32, 0.010
FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}


class Model:
    """Tokenizer, session and head truncation: what every peer runs per batch."""

    def __init__(self, model_dir: Path, precision: str) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        config = json.loads((model_dir / "config.json").read_text())
        self.n_max, self.pad_id = int(config["n_max"]), int(config.get("pad_id", 0))
        self.labels = list(config["labels"])
        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tok.no_truncation()
        self.tok.no_padding()
        self.session = ort.InferenceSession(
            str(model_dir / FILES[precision]), providers=["CPUExecutionProvider"]
        )

    def classify(self, texts: list[str]) -> list[dict[str, Any]]:
        import numpy as np

        seqs = [e.ids[: self.n_max] or [self.pad_id] for e in self.tok.encode_batch(texts)]
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)], mask[row, : len(seq)] = seq, 1
        (logits,) = self.session.run(None, {"input_ids": ids, "attention_mask": mask})
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        return [{"label": self.labels[int(p.argmax())], "score": float(p.max())} for p in probs]


try:  # only in the peers' environment
    import litserve as ls

    class LitClassifier(ls.LitAPI):  # type: ignore[misc]
        """At module level: LitServe pickles the API into its worker process."""

        def __init__(self, model_dir: Path, precision: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.model_dir, self.precision = model_dir, precision

        def setup(self, device: str) -> None:
            self.model = Model(self.model_dir, self.precision)

        def decode_request(self, request: dict[str, Any]) -> str:
            return str(request["input"])

        def predict(self, texts: list[str]) -> list[dict[str, Any]]:
            return self.model.classify(list(texts))

        def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
            return {"results": [output]}

except ImportError:
    ls = None


def run_litserve(model_dir: Path, precision: str, port: int) -> None:
    api = LitClassifier(
        model_dir, precision, max_batch_size=MAX_BATCH, batch_timeout=BATCH_TIMEOUT_S,
        api_path="/v1/classify",
    )  # fmt: skip
    server = ls.LitServer(api, accelerator="cpu", timeout=120)
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False)


def run_ray(model_dir: Path, precision: str, port: int) -> None:
    import ray
    from fastapi import FastAPI
    from ray import serve

    app = FastAPI()

    @serve.deployment(max_ongoing_requests=256)
    @serve.ingress(app)
    class Classifier:
        def __init__(self) -> None:
            self.model = Model(model_dir, precision)

        @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_TIMEOUT_S)
        async def handle(self, texts: list[str]) -> list[dict[str, Any]]:
            return self.model.classify(texts)

        @app.post("/v1/classify")
        async def classify(self, body: dict[str, Any]) -> dict[str, Any]:
            return {"results": [await self.handle(str(body["input"]))]}

        @app.get("/ready")
        async def ready(self) -> dict[str, str]:
            return {"status": "ready"}

    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Classifier.bind(), route_prefix="/")

    def stop(*_: object) -> None:
        serve.shutdown()
        ray.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    while True:
        time.sleep(3600)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("framework", choices=["litserve", "ray"])
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--precision", choices=sorted(FILES), default="int8")
    args = p.parse_args()
    run = run_litserve if args.framework == "litserve" else run_ray
    run(args.model_dir.resolve(), args.precision, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
