"""The offline ceilings bench.load measures servers against: the engine alone over the same
tokenized documents, in three schedules, with its docs/s and CPU time per document.

- length-sorted batches (the service's default limits: <= 32 documents, 16,384 padded tokens);
- one document per run (what the naive server runs, one request at a time);
- one document per run on every core at once (the service's CPU engine: one single-threaded run
  per core), shown beside the other two.

With `--tokenize`, two more schedules start from the emails' text, each text tokenized and cut
to n_max, then run alone on the service's engine (one single-threaded run per core):

- tokenizer threads feeding the engine's threads, as the service does;
- each engine thread tokenizing a text, then running it, as the naive server does.

Run alone, it measures the three schedules pass after pass on an otherwise idle machine: how far
the host's own speed drifts, and so how far apart two turns of a server benchmark can land
for no reason of their own.

    python -m bench.load_offline [--model-dir DIR] [--docs 400] [--passes 10] [--pause 0.5]
        [--tokenize]
"""

from __future__ import annotations

import os
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    base_parser,
    command_line,
    encode,
    load_test_split,
    machine,
    markdown_table,
    out_dir,
    read_config,
    versions,
    write_csv,
    write_fragment,
)
from bench.runners import batches, ort_runner
from service.artifact import pad_batch


@dataclass(frozen=True)
class OfflineResult:
    name: str
    docs_per_s: float
    cpu_ms_per_doc: float


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(
    name: str, one_pass: Callable[[], None], docs: int, passes: int, warm: bool = True
) -> OfflineResult:
    if warm:
        one_pass()  # shapes, allocators
    rates, cpus = [], []
    for _ in range(passes):
        cpu0, t0 = _cpu_s(), time.perf_counter()
        one_pass()
        rates.append(docs / (time.perf_counter() - t0))
        cpus.append(1000 * (_cpu_s() - cpu0) / docs)
    return OfflineResult(name, statistics.median(rates), statistics.median(cpus))


def reference_emails(
    model_dir: Path, data: Path, docs: int, n_max: int
) -> tuple[list[str], list[list[int]]]:
    """`docs` test emails and their token ids cut to n_max, shuffled once (seed 0) so that long
    and short ones mix, in the same order every run; emails without tokens are left out."""
    examples = load_test_split(data, docs)
    full = encode(model_dir, [e.text for e in examples])
    pairs = [(e.text, ids[:n_max]) for e, ids in zip(examples, full, strict=True) if ids]
    random.Random(0).shuffle(pairs)
    return [t for t, _ in pairs], [s for _, s in pairs]


class OfflineReference:
    """The three schedules over `seqs` (token ids already cut to n_max), loaded once so that a
    benchmark can measure them again between its server turns: on a shared host the machine's
    speed drifts, and a ceiling measured once at the start is a ceiling for another machine."""

    def __init__(
        self, model_dir: Path, precision: str, threads: int, seqs: Sequence[Sequence[int]]
    ) -> None:
        from service.engine import OnnxEngine
        from service.settings import Precision

        pad_id = 0
        run = ort_runner(model_dir, precision, threads)
        assert run is not None
        padded_batches = [pad_batch([seqs[i] for i in idx], pad_id) for idx in batches(seqs)]
        singles = [pad_batch([s], pad_id) for s in seqs]
        prec: Precision = precision  # type: ignore[assignment]
        self._engine = OnnxEngine.load(model_dir, device="cpu", precision=prec)
        self._pool = ThreadPoolExecutor(self._engine.workers)
        engine, pool = self._engine, self._pool

        def sorted_batches() -> None:
            for ids, mask in padded_batches:
                run(ids, mask)

        def one_per_run() -> None:
            for ids, mask in singles:
                run(ids, mask)

        def one_per_core() -> None:
            list(pool.map(lambda feed: engine.run(*feed), singles))

        self.docs = len(seqs)
        self.schedules: list[tuple[str, Callable[[], None]]] = [
            (f"length-sorted batches ({threads} threads)", sorted_batches),
            (f"one per run ({threads} threads)", one_per_run),
            (f"one per core ({engine.workers} runs at once, 1 thread each)", one_per_core),
        ]
        self._warm = False

    def measure(self, passes: int = 1) -> list[OfflineResult]:
        """Each schedule's median over `passes` passes (the first call warms each first)."""
        results = []
        for name, one_pass in self.schedules:
            results.append(_timed(name, one_pass, self.docs, passes, warm=not self._warm))
        self._warm = True
        return results

    def close(self) -> None:
        self._pool.shutdown()
        self._engine.close()


class TextSchedules:
    """Text to logits with the tokenizing included, on the service's engine and tokenizer: where
    the tokenizer runs, beside the engine's threads or on them, is all that differs."""

    def __init__(self, model_dir: Path, precision: str, texts: Sequence[str], n_max: int) -> None:
        from service.artifact import TOKENIZER_FILE
        from service.documents import DocumentEncoder
        from service.engine import OnnxEngine
        from service.settings import Precision

        prec: Precision = precision  # type: ignore[assignment]
        self._engine = OnnxEngine.load(model_dir, device="cpu", precision=prec)
        workers = self._engine.workers
        self._pool = ThreadPoolExecutor(workers)
        self._tokenizer_pool = ThreadPoolExecutor(workers)
        encoder = DocumentEncoder.from_file(model_dir / TOKENIZER_FILE)
        engine, pool, tokenizer_pool = self._engine, self._pool, self._tokenizer_pool
        self.texts = texts

        def run(ids: Sequence[int]) -> Any:
            return engine.run(*pad_batch([ids[:n_max]], 0))

        def tokenize(text: str) -> Any:
            return encoder.encode([text])[0]

        def beside() -> None:
            # Each tokenizer thread hands its text's tokens to the engine's threads as soon as
            # it has them, as the service does.
            def tokenize_and_hand_on(text: str) -> Future[Any]:
                return pool.submit(run, tokenize(text))

            handed = [tokenizer_pool.submit(tokenize_and_hand_on, t) for t in texts]
            for future in handed:
                future.result().result()

        def on_engine_threads() -> None:
            list(pool.map(lambda text: run(tokenize(text)), texts))

        self.schedules: list[tuple[str, Callable[[], None]]] = [
            (f"text: {workers} tokenizer threads feeding the engine's", beside),
            (f"text: tokenized on the engine's {workers} threads", on_engine_threads),
        ]
        self._warm = False

    def measure(self) -> list[OfflineResult]:
        """Each schedule's docs/s and CPU per document over one pass (after a first, warm one)."""
        return self._measure(self.schedules)

    def measure_reversed(self) -> list[OfflineResult]:
        """As `measure`, the schedules in the opposite order (results in that order too)."""
        return self._measure(self.schedules[::-1])

    def _measure(self, schedules: list[tuple[str, Callable[[], None]]]) -> list[OfflineResult]:
        results = [
            _timed(name, one_pass, len(self.texts), 1, warm=not self._warm)
            for name, one_pass in schedules
        ]
        self._warm = True
        return results

    def close(self) -> None:
        self._tokenizer_pool.shutdown()
        self._pool.shutdown()
        self._engine.close()


def median_results(measures: Sequence[Sequence[OfflineResult]]) -> list[OfflineResult]:
    """Per schedule, the median docs/s and CPU per document over several measures."""
    return [
        OfflineResult(
            group[0].name,
            statistics.median(o.docs_per_s for o in group),
            statistics.median(o.cpu_ms_per_doc for o in group),
        )
        for group in zip(*measures, strict=True)
    ]


HEADERS = ["pass", "schedule", "docs_per_s", "cpu_ms_per_doc"]
SUMMARY_HEADERS = [
    "schedule", "docs_per_s_min", "docs_per_s_median", "docs_per_s_max", "spread",
    "cpu_ms_per_doc_median",
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = base_parser("python -m bench.load_offline", __doc__ or "")
    p.add_argument("--precision", choices=["fp32", "int8"], default="int8")
    p.add_argument("--docs", type=int, help="test emails (default 100 quick, 400)")
    p.add_argument("--passes", type=int, help="passes of each schedule (default 3 quick, 10)")
    p.add_argument("--pause", type=float, default=0.5, help="seconds between passes")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--tokenize",
        action="store_true",
        help="also time two schedules from the text, tokenizer beside the engine and on it",
    )
    args = p.parse_args(argv)
    docs = args.docs if args.docs is not None else (100 if args.quick else 400)
    passes = args.passes if args.passes is not None else (3 if args.quick else 10)
    if docs < 1 or passes < 1 or args.pause < 0:
        p.error("--docs and --passes must be 1 or more, --pause 0 or more")
    started, out = machine(), out_dir(args)
    n_max = int(read_config(args.model_dir)["n_max"])

    texts, seqs = reference_emails(args.model_dir, args.data, docs, n_max)  # bench.load's
    reference = OfflineReference(args.model_dir, args.precision, args.threads, seqs)
    from_text = (
        TextSchedules(args.model_dir, args.precision, texts, n_max) if args.tokenize else None
    )
    names = [name for name, _ in reference.schedules + (from_text.schedules if from_text else [])]
    rows: list[list[Any]] = []
    try:
        for i in range(1, passes + 1):
            measured = reference.measure()
            if from_text is not None:
                # The two text schedules swap places every other pass.
                pair = from_text.measure() if i % 2 else from_text.measure_reversed()
                measured += sorted(pair, key=lambda o: names.index(o.name))
            for o in measured:
                rows.append([i, o.name, o.docs_per_s, o.cpu_ms_per_doc])
                print(f"pass {i:3d}  {o.name:48s} {o.docs_per_s:7.1f} docs/s  "
                      f"{o.cpu_ms_per_doc:5.1f} ms CPU/doc", flush=True)  # fmt: skip
            time.sleep(args.pause)
    finally:
        reference.close()
        if from_text is not None:
            from_text.close()

    summary = []
    for name in names:
        rates = [r[2] for r in rows if r[1] == name]
        cpu = statistics.median(r[3] for r in rows if r[1] == name)
        summary.append(
            [name, min(rates), statistics.median(rates), max(rates), max(rates) / min(rates), cpu]
        )
    write_csv(out / "offline.csv", HEADERS, rows)
    body = "\n\n".join(
        [
            f"Each schedule over the same {len(seqs)} tokenized emails, {passes} passes in turn "
            f"with {args.pause:g} s between passes, nothing else running. The spread is the "
            "fastest pass over the slowest."
            + (
                " The schedules marked text start from the emails' text and tokenize it; they "
                "swap places every other pass."
                if from_text
                else ""
            ),
            markdown_table(
                SUMMARY_HEADERS,
                summary,
            ),
            markdown_table(HEADERS, rows),
        ]
    )
    path = write_fragment(
        out, "offline", "The offline engine, pass after pass",
        command_line("bench.load_offline", argv),
        {
            "Model": f"{args.model_dir.name}, precision {args.precision}",
            "Software": versions("onnxruntime"),
        },
        body, args.quick, started,
    )  # fmt: skip
    print(f"wrote {path} and offline.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
