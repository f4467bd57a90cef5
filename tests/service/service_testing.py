"""Helpers of the service tests: a tiny tokenizer, a controllable fake engine, app runners."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from service.artifact import ArtifactConfig, FloatArray, IntArray
from service.engine import FakeEngine
from service.settings import Settings

SENTENCES = [
    "Win a free prize now, click here to claim your reward!",
    "Meeting moved to Thursday; the agenda is attached.",
    "Cheap meds, no prescription, limited offer, act now.",
    "Can you review the patch before the release on Monday?",
    "URGENT: your account was suspended, verify your password.",
    "Lunch at noon? The usual place near the station.",
]

FAKE_CONFIG = {
    "name": "fake-linformer",
    "version": "0.0.1",
    "labels": ["ham", "spam"],
    "flag_labels": ["spam"],
    "threshold": 0.5,
    "n_max": 64,
    "pad_id": 0,
    "k": 16,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 2,
    "sharing": "layerwise",
    "data_version": "test",
}


def train_tokenizer(vocab_size: int = 300) -> Tokenizer:
    """A tiny byte-level BPE whose id 0 is the pad token."""
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(SENTENCES * 4, trainer=trainer)
    return tokenizer


class ControlledEngine(FakeEngine):
    """A fake engine whose runs can be held at a gate, made to fail, and inspected."""

    def __init__(self, config: ArtifactConfig, fail_if: Callable[[IntArray], bool] | None = None):
        super().__init__(config)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)
        self.fail_if = fail_if
        self.seen: list[IntArray] = []

    def run(self, input_ids: IntArray, attention_mask: IntArray, solo: bool = False) -> FloatArray:
        self.seen.append(input_ids.copy())
        self.entered.release()
        if not self.gate.wait(timeout=10):
            raise TimeoutError("test gate never opened")
        if self.fail_if is not None and self.fail_if(input_ids):
            raise RuntimeError("boom")
        return super().run(input_ids, attention_mask)

    def single(self, window: IntArray) -> FloatArray:
        """Logits of one window run alone, without recording it."""
        logits = FakeEngine.run(self, window[None, :], np.ones((1, window.size), dtype=np.int64))
        self.runs.pop()
        return logits[0]


def make_settings(model_dir: Path, **overrides: Any) -> Settings:
    """Settings isolated from the environment, for an app in a test."""
    values: dict[str, Any] = {
        "model_dir": model_dir,
        "max_wait_ms": 1.0,
        "log_format": "text",
        "database_url": "sqlite://",  # batch jobs in memory, never a file in the working tree
    }
    return Settings(**(values | overrides))


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and yield a client once /ready is 200."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://linmod") as client:
            # Warm-up times the engine over batch shapes: seconds for a real model.
            await wait_ready(client)
            yield client


async def wait_ready(client: httpx.AsyncClient | Any, attempts: int = 12_000) -> None:
    """Poll /ready until 200 (each attempt 10 ms apart: two minutes at most)."""
    for _ in range(attempts):
        if (await client.get("/ready")).status_code == 200:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the app never became ready")


async def until(condition: Callable[[], bool], attempts: int = 500) -> None:
    """Poll a condition every 10 ms until it holds."""
    for _ in range(attempts):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never met")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_server_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> None:
    """Poll `url`/ready until it answers 200; kill the server and show its log if it exits
    first or is not ready within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}):\n{log_tail(log)}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise AssertionError(f"server not ready after {timeout:.0f} s:\n{log_tail(log)}")


def log_tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:]
