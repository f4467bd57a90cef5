"""What the load generator spends on each answer it reads: by the answer's bytes, and by how the
answers arrive. On a 2-core host the load generator shares the cores with the server it
measures, so its CPU per answer is CPU the server does not get.

Stub servers (uvicorn, no model) answer every request after the same seeded delays, with the
service's headers and body for a short text or the naive server's, each answer sent when it is
due ("one at a time") or held to the next tick of a shared clock and sent with the others due
then ("in bursts"). With `--model-dir`, the service and the naive server serving that model
take their turns beside the stubs, on test emails with `long_document: truncate` as in
`bench.load`. The load generator is `bench.loadgen`'s, as `bench.load` runs it; the servers take
turns, and each row gives the medians over the turns.

    python -m bench.answer_cost [--requests 1000] [--clients 32] [--repeats 3] [--burst-ms 20]
        [--model-dir DIR [--data DIR]]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import resource
import statistics
import sys
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.common import (
    DEFAULT_DATA_DIR,
    command_line,
    load_test_split,
    machine,
    markdown_table,
    out_dir,
    read_config,
    versions,
    write_csv,
    write_fragment,
)

# What each server answers for a short text (`curl -si -H 'content-type: application/json' -d
# '{"input": "hello there, cheap meds", "long_document": "truncate"}'` to its /v1/classify):
# uvicorn adds date and server to both, so the service's answer has 11 headers and the naive
# server's 4.
SERVICE_BODY = (
    b'{"id":"cls-200105ab76284d179f86e6eabd442db3","object":"classification","model":'
    b'"spamassassin-linformer-distilled","results":[{"label":"ham","score":0.9965105652809143,'
    b'"scores":{"ham":0.9965105652809143,"spam":0.0034894829150289297},"flagged":false,'
    b'"tokens":8,"chunks":1,"truncated":false}],"usage":{"tokens":8,"chunks":1}}'
)
SERVICE_HEADERS = [
    (b"x-tokenization-time-ms", b"2.46"),
    (b"x-queue-time-ms", b"0.00"),
    (b"x-inference-time-ms", b"2.20"),
    (b"content-type", b"application/json"),
    (b"x-request-id", b"200105ab76284d179f86e6eabd442db3"),
    (b"x-total-time-ms", b"7.02"),
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
]
NAIVE_BODY = (
    b'{"results":[{"label":"ham","score":0.9976089000701904,"flagged":false,"tokens":7,'
    b'"truncated":false}]}'
)
NAIVE_HEADERS = [(b"content-type", b"application/json")]
ANSWERS = {
    "service's": (SERVICE_HEADERS, SERVICE_BODY),
    "naive server's": (NAIVE_HEADERS, NAIVE_BODY),
}
ARRIVALS = ("one at a time", "in bursts")
# The real servers (with --model-dir): their command from (model dir, port, a scratch folder).
REAL: dict[str, Callable[[Path, int, Path], list[str]]] = {
    "the service": lambda model, port, tmp: loadgen.service_command(
        model, port, "int8", tmp / "jobs.db"
    ),
    "the naive server": lambda model, port, tmp: loadgen.naive_command(model, port, "int8"),
}
AS_SERVED = "as served"
HEADERS = [
    "answer", "header_lines", "body_bytes", "arrival", "answers_per_s",
    "client_cpu_ms_per_answer", "client_wakeups_per_answer", "turns",
]  # fmt: skip

App = Callable[[dict[str, Any], Any, Any], Coroutine[Any, Any, None]]


def stub_app(answer: str, bursts: bool, mean_ms: float, burst_ms: float, seed: int = 0) -> App:
    """An ASGI app answering every POST with `answer`'s headers and body after a delay drawn
    uniformly from 0 to twice `mean_ms` (the same sequence for every stub with the same seed); in
    bursts, the answer then waits for the next multiple of `burst_ms` on the loop's clock."""
    headers, body = ANSWERS[answer]
    start_headers = [*headers, (b"content-length", str(len(body)).encode())]
    rng = random.Random(seed)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        if scope["method"] == "POST":
            await asyncio.sleep(rng.uniform(0, 2 * mean_ms) / 1000)
            if bursts:
                now = asyncio.get_running_loop().time()
                tick = burst_ms / 1000
                await asyncio.sleep(math.ceil(now / tick) * tick - now)
        await send({"type": "http.response.start", "status": 200, "headers": start_headers})
        await send({"type": "http.response.body", "body": body})

    return app


def serve(argv: list[str]) -> int:
    """The stub server: `serve ANSWER ARRIVAL PORT MEAN_MS BURST_MS` (run by `main`)."""
    import uvicorn

    answer, arrival, port, mean_ms, burst_ms = argv
    app = stub_app(answer, arrival == "in bursts", float(mean_ms), float(burst_ms))
    uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning", access_log=False)
    return 0


def client_usage() -> tuple[float, int]:
    """This process's CPU seconds (user + system) and voluntary context switches so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_nvcsw


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench.answer_cost", description=__doc__)
    p.add_argument("--requests", type=int, default=1000, help="requests per stub per turn")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="turns, every other one reversed")
    p.add_argument("--mean-ms", type=float, default=150.0, help="mean delay before an answer")
    p.add_argument("--burst-ms", type=float, default=20.0, help="the bursts' clock tick")
    p.add_argument(
        "--model-dir",
        type=Path,
        help="also measure the service and the naive "
        "server serving this model (int8), on the test split's emails",
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="dataset with test.jsonl")
    p.add_argument("--quick", action="store_true", help="write under bench/results/quick/")
    p.add_argument("--out", type=Path, help="results directory (default bench/results/)")
    args = p.parse_args(argv)
    for name in ("requests", "clients", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be 1 or more")
    if args.mean_ms < 0 or args.burst_ms <= 0:
        p.error("--mean-ms must be 0 or more and --burst-ms more than 0")
    started, out = machine(), out_dir(args)
    stubs = [(answer, arrival) for arrival in ARRIVALS for answer in ANSWERS]
    texts = {stub: ["hello there, cheap meds"] * args.requests for stub in stubs}
    if args.model_dir is not None:
        read_config(args.model_dir)  # exits with advice where it is not a model artifact
        emails = [e.text for e in load_test_split(args.data, args.requests)]
        random.Random(0).shuffle(emails)
        stubs += [(name, AS_SERVED) for name in REAL]
        texts.update({(name, AS_SERVED): emails for name in REAL})
    extra = {"long_document": "truncate"}
    figures: dict[tuple[str, str], list[tuple[float, float, float]]] = {s: [] for s in stubs}
    with tempfile.TemporaryDirectory(prefix="answer-cost-") as tmp:
        servers: dict[tuple[str, str], loadgen.ServerProcess] = {}
        try:
            for answer, arrival in stubs:
                port = loadgen.free_port()
                log = Path(tmp) / f"{len(servers)}.log"
                if arrival == AS_SERVED:
                    assert args.model_dir is not None
                    cmd = REAL[answer](args.model_dir.resolve(), port, Path(tmp))
                    ready = "/ready"
                else:
                    cmd = [
                        sys.executable, "-m", "bench.answer_cost", "serve", answer, arrival,
                        str(port), str(args.mean_ms), str(args.burst_ms),
                    ]  # fmt: skip
                    ready = "/"
                servers[answer, arrival] = loadgen.ServerProcess(
                    cmd, f"http://127.0.0.1:{port}", log, ready_path=ready
                )
            for stub in stubs:  # warm-up: connections and first-call costs
                warm = texts[stub][:64]
                asyncio.run(loadgen.run_level(servers[stub].url, warm, args.clients, extra=extra))
            for turn in range(args.repeats):
                for stub in stubs if turn % 2 == 0 else stubs[::-1]:
                    cpu0, switches0 = client_usage()
                    level = loadgen.run_level(
                        servers[stub].url, texts[stub], args.clients, extra=extra
                    )
                    got = asyncio.run(level)
                    cpu1, switches1 = client_usage()
                    if got.ok != len(texts[stub]):
                        raise SystemExit(f"{stub}: {got.ok} of {len(texts[stub])} answered")
                    n = got.ok
                    figures[stub].append(
                        (got.throughput, 1000 * (cpu1 - cpu0) / n, (switches1 - switches0) / n)
                    )
                    print(f"turn {turn + 1}: {stub[0]} answers, {stub[1]}: "
                          f"{figures[stub][-1][1]:.3f} client ms each", flush=True)  # fmt: skip
        finally:
            for server in servers.values():
                server.stop()
    rows: list[list[Any]] = []
    for answer, arrival in stubs:
        per_turn = figures[answer, arrival]
        medians = [statistics.median(f[i] for f in per_turn) for i in range(3)]
        shape: list[Any] = ["–", "–"]  # a real server's answers vary with the email
        if answer in ANSWERS:
            headers, body = ANSWERS[answer]
            shape = [len(headers) + 3, len(body)]
        rows.append([
            answer, *shape, arrival, round(medians[0], 1), round(medians[1], 3),
            round(medians[2], 2), len(per_turn),
        ])  # fmt: skip
    write_csv(out / "answer-cost.csv", HEADERS, rows)
    body_md = "\n\n".join([
        markdown_table(HEADERS, rows),
        "`header_lines` counts content-length and uvicorn's date and server. "
        "`client_cpu_ms_per_answer`: the load generator's user and system CPU over the turn, "
        "per answer; `client_wakeups_per_answer`: its voluntary context switches (`getrusage`), "
        "per answer. Every stub waits the same seeded delays; in bursts the answers then wait "
        f"for the next {args.burst_ms:g} ms tick. The real servers' rows (with `--model-dir`) "
        "answer test emails sent with `long_document: truncate`.",
    ])  # fmt: skip
    facts = {
        "Load": f"{args.requests} requests per stub per turn, {args.clients} clients, "
        f"{args.repeats} turns; delays uniform over 0 to {2 * args.mean_ms:g} ms",
        "Software": versions("uvicorn", "httptools"),
    }
    path = write_fragment(
        out, "answer-cost", "What the load generator spends on each answer",
        command_line("bench.answer_cost", argv), facts, body_md, args.quick, started,
    )  # fmt: skip
    print(markdown_table(HEADERS, rows))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
