"""On a CUDA host: the engine really runs on CUDA, fp16 agrees with fp32, and batching stays exact.

Skipped unless ONNX Runtime can really use CUDA (tests/conftest.py checks the libraries load).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from service_testing import make_settings, serving

from export.parity import session_inputs
from service.app import create_app
from service.engine import OnnxEngine

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_cuda_engine_uses_cuda_and_fp16_agrees_with_fp32(tiny_artifact: Path) -> None:
    cuda16 = OnnxEngine.load(tiny_artifact, device="cuda", precision="fp16")
    cpu32 = OnnxEngine.load(tiny_artifact, device="cpu", precision="fp32")
    assert cuda16.provider == "CUDAExecutionProvider" and cuda16.precision == "fp16"
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(2, 500, size=n)) for n in (1, 7, 33, 64)]
    feed = session_inputs(seqs, pad_id=0)

    def probs(logits: np.ndarray) -> np.ndarray:
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    got = probs(cuda16.run(feed["input_ids"], feed["attention_mask"]))
    want = probs(cpu32.run(feed["input_ids"], feed["attention_mask"]))
    np.testing.assert_allclose(got, want, atol=1e-2)


async def test_auto_picks_cuda_and_reports_it(tiny_artifact: Path) -> None:
    async with serving(create_app(make_settings(tiny_artifact, device="auto"))) as client:
        info = (await client.get("/info")).json()
        assert info["runtime"]["provider"] == "CUDAExecutionProvider"
        metrics = (await client.get("/metrics")).text
        assert 'provider="CUDAExecutionProvider"' in metrics
        r = await client.post(
            "/v1/classify", json={"input": ["hello there", "win money now " * 30]}
        )
        assert r.status_code == 200 and len(r.json()["results"]) == 2
