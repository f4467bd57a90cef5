"""Inference engines: an ONNX Runtime engine over a model artifact, and a weightless fake.

An engine maps right-padded int64 (input_ids, attention_mask) to float32 logits; it is called
from one worker thread at a time and knows nothing of queues or HTTP.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from service.artifact import (
    INPUT_NAMES,
    MODEL_FILES,
    OUTPUT_NAME,
    ArtifactConfig,
    ArtifactError,
    FloatArray,
    IntArray,
)
from service.settings import Device, Precision

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class EngineError(RuntimeError):
    """The model cannot be loaded or run as configured."""


class Engine(Protocol):
    """What the batcher needs from a model."""

    config: ArtifactConfig
    provider: str
    precision: str
    workers: int  # runs that may execute at once, each from its own thread

    def run(self, input_ids: IntArray, attention_mask: IntArray, solo: bool = False) -> FloatArray:
        """Logits [batch, num_labels] for right-padded inputs [batch, length]; `solo`: no
        other run is in flight, so this one may use every core."""
        ...

    def close(self) -> None:
        """Release the model."""
        ...


def choose_precision(requested: Precision, on_cuda: bool, model_dir: Path) -> str:
    """The precision to load: the requested one, or for auto the best file present."""
    if requested != "auto":
        if not (model_dir / MODEL_FILES[requested]).is_file():
            raise EngineError(
                f"precision {requested}: {model_dir / MODEL_FILES[requested]} missing"
            )
        return requested
    preferred = "fp16" if on_cuda else "int8"
    return preferred if (model_dir / MODEL_FILES[preferred]).is_file() else "fp32"


class OnnxEngine:
    """An ONNX Runtime session over one model file; `load` picks provider and precision."""

    def __init__(
        self,
        session: Any,
        config: ArtifactConfig,
        precision: str,
        workers: int = 1,
        wide_session: Any = None,
    ) -> None:
        self._session = session
        self._wide = wide_session  # every core on one run, for a run with none beside it
        self.solo_session = wide_session is not None
        self.config = config
        self.precision = precision
        self.workers = workers
        self.provider: str = session.get_providers()[0]
        names = {i.name for i in session.get_inputs()}
        if not set(INPUT_NAMES) <= names:
            raise EngineError(f"model inputs are {sorted(names)}, need {', '.join(INPUT_NAMES)}")
        outputs = [o.name for o in session.get_outputs()]
        self._output = OUTPUT_NAME if OUTPUT_NAME in outputs else outputs[0]

    @classmethod
    def load(
        cls,
        model_dir: Path,
        *,
        device: Device = "auto",
        precision: Precision = "auto",
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        workers: int = 0,
        allow_spinning: bool = False,
    ) -> OnnxEngine:
        """Create the session; `cuda` fails unless CUDA is really in use, `auto` falls back.

        On the CPU the cores are shared out between `workers` concurrent runs and each run's
        `intra_op_threads` (0 for either: see `cpu_split`); on CUDA one run at a time.
        """
        import onnxruntime as ort  # imported here so that tests of the fake engine skip it

        try:
            config = ArtifactConfig.from_dir(model_dir)
        except ArtifactError as exc:
            raise EngineError(str(exc)) from exc
        cpu_workers, cpu_threads = cpu_split(workers, intra_op_threads)

        def options_for(threads: int, spin: bool, stop_between: bool) -> Any:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = inter_op_threads
            # Spinning intra-op threads burn the cores the event loop and tokenizer need
            # between runs; off unless asked for (or for the solo session: see below).
            options.add_session_config_entry("session.intra_op.allow_spinning", str(int(spin)))
            # Spin within a run (between its parallel sections), stop as soon as it returns.
            options.add_session_config_entry("session.force_spinning_stop", str(int(stop_between)))
            return options

        def session(prec: str, providers: list[str], threads: int, spin: bool = False) -> Any:
            path = model_dir / MODEL_FILES[prec]
            try:
                options = options_for(threads, spin or allow_spinning, spin and not allow_spinning)
                return ort.InferenceSession(str(path), options, providers=providers)
            except Exception as exc:  # ORT raises its own untyped errors
                raise EngineError(f"cannot load {path}: {exc}") from exc

        has_cuda = CUDA in ort.get_available_providers()
        if device == "cuda" and not has_cuda:
            raise EngineError("device=cuda, but this onnxruntime build has no CUDA provider")
        if device != "cpu" and has_cuda:
            prec = choose_precision(precision, True, model_dir)
            sess = session(prec, [CUDA, CPU], intra_op_threads)
            # onnxruntime-gpu quietly falls back to CPU when CUDA or cuDNN libraries are
            # missing, so only the providers of the created session tell the truth.
            if CUDA in sess.get_providers():
                log.info("model loaded", extra={"provider": CUDA, "precision": prec})
                return cls(sess, config, prec, workers=max(1, workers))
            if device == "cuda":
                raise EngineError(
                    "device=cuda, but ONNX Runtime could not use CUDA (are the CUDA and cuDNN "
                    "libraries it needs installed?); use --device auto or cpu to run on CPU"
                )
            log.warning("CUDA unavailable, falling back to CPU", extra={"provider": CPU})
        prec = choose_precision(precision, False, model_dir)
        # Concurrent narrow runs keep every core busy under load; alone, a run is quicker
        # spread over all the cores, so a second session does that when nothing else runs.
        # Its threads spin (without, each parallel section waits for threads to wake: 20%
        # slower here): it runs only when the cores are otherwise idle.
        cores = cpu_workers * cpu_threads
        wide = None
        if cpu_workers > 1 and cpu_threads < cores:
            wide = session(prec, [CPU], cores, spin=True)
        engine = cls(
            session(prec, [CPU], cpu_threads), config, prec, workers=cpu_workers, wide_session=wide
        )
        log.info(
            "model loaded",
            extra={"provider": engine.provider, "precision": prec, "workers": cpu_workers,
                   "intra_op_threads": cpu_threads},
        )  # fmt: skip
        return engine

    def run(self, input_ids: IntArray, attention_mask: IntArray, solo: bool = False) -> FloatArray:
        """Logits [batch, num_labels] as float32 (fp16 models are cast up)."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        session = self._wide if solo and self._wide is not None else self._session
        (logits,) = session.run([self._output], feeds)
        return np.asarray(logits, dtype=np.float32)

    def close(self) -> None:
        """Drop the sessions."""
        self._session = self._wide = None


def cpu_split(workers: int, intra_op_threads: int) -> tuple[int, int]:
    """(concurrent runs, intra-op threads each) over this process's cores; 0 means choose.

    By default every core runs its own window with one thread: on a CPU, a small model's run
    scales poorly over threads (two threads on one window cost about 1.4x the CPU time of one),
    while separate runs on separate cores do not share anything.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = max(1, cores or 1)
    if workers and intra_op_threads:
        return workers, intra_op_threads
    if workers:
        return workers, max(1, cores // workers)
    if intra_op_threads:
        return max(1, cores // intra_op_threads), intra_op_threads
    return cores, 1


class FakeEngine:
    """A deterministic, batch-invariant function of each row's real ids; no weights.

    It serves API tests and lets the HTTP layer be measured without a model; `delay_s`
    stands in for compute time. `runs` records the (batch, length) of every call.
    """

    def __init__(self, config: ArtifactConfig, *, delay_s: float = 0.0) -> None:
        self.config = config
        self.provider = "fake"
        self.precision = "fp32"
        self.workers = 1
        self.delay_s = delay_s
        self.runs: list[tuple[int, int]] = []

    def run(self, input_ids: IntArray, attention_mask: IntArray, solo: bool = False) -> FloatArray:
        """Logits from a hash of each row's unpadded ids."""
        self.runs.append((int(input_ids.shape[0]), int(input_ids.shape[1])))
        if self.delay_s:
            time.sleep(self.delay_s)
        num_labels = len(self.config.labels)
        logits = np.empty((input_ids.shape[0], num_labels), dtype=np.float32)
        for row, (ids, mask) in enumerate(zip(input_ids, attention_mask, strict=True)):
            real = ids[mask.astype(bool)]
            seed = int((real * (np.arange(real.size) % 31 + 1)).sum() % 1_000_003)
            columns = np.arange(num_labels)
            logits[row] = ((seed * (columns + 7) * 2_654_435_761) % 1000) / 125.0 - 4.0
        return logits

    def close(self) -> None:
        """Nothing to release."""


def warmup_shapes(n_max: int, max_batch_tokens: int, max_batch_size: int) -> list[tuple[int, int]]:
    """(batch, length) pairs that cover short, long and full batches."""
    shapes = {(1, min(16, n_max)), (1, n_max)}
    for length in (min(64, n_max), n_max):
        batch = max(1, min(max_batch_size, max_batch_tokens // length))
        shapes.add((batch, length))
    return sorted(shapes)


def warmup(engine: Engine, shapes: list[tuple[int, int]]) -> float:
    """Run each shape once (allocators, kernels, CUDA graphs); returns seconds taken.

    An engine with a separate session for runs alone warms that one too: on an idle server it
    serves the first requests, and cold, its first long window pays for growing its arena.
    """
    start = time.perf_counter()
    token = 1 if engine.config.pad_id != 1 else 2  # any id but the pad id
    sessions = (False, True) if getattr(engine, "solo_session", False) else (False,)
    for batch, length in shapes:
        ids = np.full((batch, length), token, dtype=np.int64)
        for solo in sessions:
            engine.run(ids, np.ones((batch, length), dtype=np.int64), solo)
    return time.perf_counter() - start
