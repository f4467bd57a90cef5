"""The load generator against an in-process app, the batch file it uploads, RESULTS.md assembly."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from bench.load import (
    NAIVE,
    SERVICE,
    each_turn,
    one_client_interval,
    one_client_turn,
    report,
    side_by_side,
)
from bench.load_offline import OfflineResult
from bench.loadgen import LevelResult, batch_file, free_port, run_level
from bench.run_all import BENCHMARKS, assemble, parse, relink
from tests.uvicorn_thread import uvicorn_in_thread


async def test_run_level_counts_every_answer() -> None:
    app = FastAPI()
    seen: list[dict[str, object]] = []

    @app.post("/v1/classify")
    async def classify(body: dict[str, object]) -> JSONResponse:
        seen.append(body)
        status = {"busy": 429, "bad": 500}.get(str(body["input"]), 200)
        return JSONResponse({"ok": status == 200}, status_code=status)

    texts = ["a", "busy", "b", "bad", "c", "busy"]
    with uvicorn_in_thread(app) as url:  # a real server: the load generator speaks HTTP over TCP
        result = await run_level(url, texts, 3, extra={"long_document": "truncate"})
    assert (result.ok, result.throttled, result.errors) == (3, 2, 1)
    assert len(result.latencies) == 3 and result.seconds > 0
    assert sorted(str(b["input"]) for b in seen) == sorted(texts)  # each text sent once
    assert all(b["long_document"] == "truncate" for b in seen)


async def test_run_level_opens_a_new_connection_when_the_server_closes_one() -> None:
    app = FastAPI()

    @app.post("/v1/classify")
    async def classify(body: dict[str, object]) -> JSONResponse:
        # Every other answer asks to close: uvicorn then closes the connection after it.
        close = int(str(body["input"])) % 2 == 0
        return JSONResponse({}, headers={"connection": "close"} if close else None)

    texts = [str(i) for i in range(12)]
    with uvicorn_in_thread(app) as url:
        result = await run_level(url, texts, 2)
    assert result.statuses == {200: 12}


async def test_run_level_counts_a_dropped_connection_as_no_answer() -> None:
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.readuntil(b"\r\n\r\n"):
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            text = json.loads(await reader.readexactly(length))["input"]
            seen.append(text)
            if text == "drop":  # hang up without an answer
                writer.close()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        result = await run_level(f"http://127.0.0.1:{port}", ["a", "drop", "b", "c"], 1)
    assert seen == ["a", "drop", "b", "c"]  # the client went on, on a new connection
    assert result.statuses == {200: 3, 0: 1} and len(result.latencies) == 3


def test_batch_file_is_openai_batch_jsonl() -> None:
    lines = batch_file(["x", "y"], 5, {"long_document": "truncate"}).decode().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["custom_id"] for r in rows] == [f"req-{i}" for i in range(5)]
    assert {r["method"] for r in rows} == {"POST"} and {r["url"] for r in rows} == {"/v1/classify"}
    assert [r["body"]["input"] for r in rows] == ["x", "y", "x", "y", "x"]


def test_relink_points_images_at_the_fragments() -> None:
    text = "see ![plot](attention.png) and [x](https://e.org/a.png)"
    assert relink(text, "results") == (
        "see ![plot](results/attention.png) and [x](https://e.org/a.png)"
    )
    assert relink(text, ".") == text


def test_assemble_takes_every_fragment_in_order(tmp_path: Path) -> None:
    fragments = tmp_path / "results"
    fragments.mkdir()
    (fragments / "engine.md").write_text("## Engines\n\n![e](engine.png)\n")
    (fragments / "attention.md").write_text("## Attention\n\nfigures\n")
    dest = tmp_path / "RESULTS.md"
    text = assemble(fragments, dest, {"engine": (0, 60.0), "load": (1, 30.0)}, False, "cmd")
    assert dest.read_text() == text
    assert text.index("## Attention") < text.index("## Engines") < text.index("## load")
    assert "](results/engine.png)" in text
    assert "No results yet: run `python -m bench.load`" in text
    assert "failed (exit 1)" in text and "earlier run" in text
    assert "Quick mode" not in text
    assert "- Assembled on: " in text and "each section names the machine" in text


def test_run_all_arguments() -> None:
    args = parse(["--quick", "--only", "engine", "load"])
    assert args.quick and args.only == ["engine", "load"]
    assert list(BENCHMARKS) == ["attention", "engine", "costgrid", "load", "paired"]


def test_process_tree_cpu_counts_children() -> None:
    import subprocess
    import sys

    from bench.loadgen import process_tree_cpu_s

    # A parent that starts a child burning CPU, and waits: the child's time is the tree's.
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\n"
    code = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', {burn!r}])\n"
        "time.sleep(30)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        import time

        deadline = time.monotonic() + 20
        seen = 0.0
        while time.monotonic() < deadline and seen < 0.3:
            seen = process_tree_cpu_s(parent.pid)
            time.sleep(0.05)
        assert seen >= 0.3  # the child's busy loop, counted while it is alive
    finally:
        parent.kill()
        parent.wait()


class _Served:
    """A real uvicorn server in a thread, with what `one_client_turn` reads of a server process."""

    def __init__(self, name: str, log: list[tuple[str, str]]) -> None:
        app = FastAPI()

        @app.post("/v1/classify")
        async def classify(body: dict[str, object]) -> dict[str, bool]:
            log.append((name, str(body["input"])))
            return {"ok": True}

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)

    def cpu_s(self) -> float:
        return time.process_time()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def test_one_client_turn_alternates_the_servers_block_by_block() -> None:
    log: list[tuple[str, str]] = []
    servers = {"a": _Served("a", log), "b": _Served("b", log)}
    texts = [f"text {i}" for i in range(7)]
    try:
        got = one_client_turn(servers, texts, block=3, turn=1)  # type: ignore[arg-type]
    finally:
        for s in servers.values():
            s.stop()
    # Blocks of 3, 3 and 1 texts; who goes first alternates block to block, and turn to turn.
    expected = []
    for b, chunk in enumerate([texts[0:3], texts[3:6], texts[6:]]):
        order = ["a", "b"] if (b + 1) % 2 == 0 else ["b", "a"]
        expected += [(name, text) for name in order for text in chunk]
    assert log == expected
    for result, stats, cpu in got.values():  # one merged result per server
        assert result.clients == 1 and result.ok == len(texts) == len(result.latencies)
        assert result.seconds > 0 and stats == {} and cpu >= 0


def test_one_client_interval_pairs_each_text_across_the_servers() -> None:
    def turn(latencies: list[float]) -> LevelResult:
        return LevelResult(1, seconds=sum(latencies), latencies=latencies, statuses={200: 8})

    naive = [0.010, 0.020, 0.012, 0.030, 0.011, 0.025, 0.014, 0.018]
    ours = [x + 0.001 for x in naive]  # every text 1 ms slower
    got = one_client_interval([turn(ours), turn(ours)], [turn(naive), turn(naive)], block=2)
    assert got is not None
    low, high, diff = got
    assert abs(diff - 1.0) < 1e-9 and 1.0 < low <= high  # 8 blocks: 4 a turn
    # Fewer blocks than that: the difference, but no interval.
    few = one_client_interval([turn(ours)], [turn(naive)], block=4)
    assert few is not None and few[0] != few[0] and few[1] != few[1]
    assert abs(few[2] - 1.0) < 1e-9
    # A turn that lost an answer cannot be paired text by text.
    assert one_client_interval([turn(ours[:-1])], [turn(naive)], block=2) is None


def test_side_by_side_measures_the_offline_ceiling_after_every_turn() -> None:
    log: list[tuple[str, str]] = []
    servers = {"a": _Served("a", log), "b": _Served("b", log)}
    texts = [f"text {i}" for i in range(4)]
    measures: dict[int, list[list[OfflineResult]]] = {}
    each: dict[int, dict[str, list[LevelResult]]] = {}

    def offline() -> list[OfflineResult]:
        log.append(("offline", ""))
        return [OfflineResult("one per run (2 threads)", 10.0 + len(log), 1.0)]

    try:
        rows = side_by_side(
            servers,  # type: ignore[arg-type]
            texts, [1, 3], 2, 1.0, block=2, offline=offline, offline_turns=measures,
            level_turns=each,
        )  # fmt: skip
    finally:
        for s in servers.values():
            s.stop()
    assert [(r[0], r[1]) for r in rows] == [("a", 1), ("b", 1), ("a", 3), ("b", 3)]
    assert {c: len(m) for c, m in measures.items()} == {1: 2, 3: 2}  # one per turn and level
    # Every turn's own result, by level and server: each sent every text once, 3 clients or 1.
    assert {
        c: {n: [(r.clients, r.ok) for r in t] for n, t in by.items()} for c, by in each.items()
    } == {
        1: {"a": [(1, 4), (1, 4)], "b": [(1, 4), (1, 4)]},
        3: {"a": [(3, 4), (3, 4)], "b": [(3, 4), (3, 4)]},
    }
    # After the warm-up (8 clients, 4 texts each), every turn sends each server every text and
    # then measures the offline engine, before the next turn begins.
    turns = log[8:]
    for turn in range(4):
        chunk = turns[turn * 9 : (turn + 1) * 9]
        assert chunk[-1] == ("offline", "")
        assert sorted(chunk[:-1]) == sorted((n, t) for n in "ab" for t in texts)
    # At 3 clients (turns 3 and 4) the servers go a, b, then b, a: every other turn reversed.
    assert [n for n, _ in turns[18:26:4]] == ["a", "b"]
    assert [n for n, _ in turns[27:35:4]] == ["b", "a"]


def report_row(name: str, clients: int, docs_per_s: float) -> list[object]:
    """A load-table row as `report` reads it (the columns up to outside_engine_ms)."""
    return [name, clients, docs_per_s, 10.0, 20.0, 30.0, 100, 0, 0, 15.0, 1.0]


def report_args(tmp_path: Path) -> object:
    """The arguments of `bench.load` that `report` reads."""
    from types import SimpleNamespace

    return SimpleNamespace(
        precision="int8", threads=2, block=50, model_dir=tmp_path / "m", interactive_clients=4,
        interactive_requests=10, service_flag=[], quick=False,
    )  # fmt: skip


def test_report_holds_a_level_to_the_ceiling_of_its_own_turns(tmp_path: Path) -> None:

    from bench.common import machine

    rows = [report_row(SERVICE, 1, 40.0), report_row(NAIVE, 1, 41.0)]
    rows += [report_row(SERVICE, 32, 90.0), report_row(NAIVE, 32, 80.0)]
    start = [
        OfflineResult("length-sorted batches (2 threads)", 95.0, 20.0),
        OfflineResult("one per run (2 threads)", 120.0, 16.0),
        OfflineResult("one per core (2 runs at once, 1 thread each)", 200.0, 12.0),
    ]
    # Measured again beside the 32-client turns, the machine had slowed down.
    slower = [OfflineResult(o.name, o.docs_per_s * 0.8, o.cpu_ms_per_doc) for o in start]
    args = report_args(tmp_path)
    report(
        args, [], tmp_path, machine(), rows, [], "not run", [], start, {}, 400, None, {32: slower}
    )
    text = (tmp_path / "load.md").read_text()
    assert (
        "best offline schedule in the same turns (one per run (2 threads), 96.0 docs/s) | 0.94 | met"
        in text
    )
    assert "| one per run (2 threads) | 120 | 16.0 | 96.0 |" in text
    report(args, [], tmp_path, machine(), rows, [], "not run", [], start, {}, 400, None)
    text = (tmp_path / "load.md").read_text()  # without them, the ceiling measured first
    assert "best offline schedule (one per run (2 threads), 120.0 docs/s) | 0.75 | missed" in text


def test_report_shows_each_turns_ratio_beside_the_medians(tmp_path: Path) -> None:

    from bench.common import machine

    def level(clients: int, seconds: float, latency_s: float) -> LevelResult:
        return LevelResult(clients, seconds, [latency_s] * 100, {200: 100})

    # Three turns at 32 clients: the service 1.25x, 1.00x and 1.11x the naive server's docs/s.
    turns = {
        32: {
            SERVICE: [level(32, 0.8, 0.2), level(32, 1.0, 0.2), level(32, 0.9, 0.5)],
            NAIVE: [level(32, 1.0, 0.5), level(32, 1.0, 0.5), level(32, 1.0, 0.5)],
        },
        1: {SERVICE: [level(1, 1.0, 0.009)], NAIVE: [level(1, 1.0, 0.010)]},
    }
    ceiling = [
        [OfflineResult("one per run (2 threads)", 100.0, 10.0)],
        [OfflineResult("one per run (2 threads)", 125.0, 10.0)],
        # one per core is not the ceiling, however fast
        [
            OfflineResult("one per run (2 threads)", 120.0, 10.0),
            OfflineResult("one per core (2 runs at once, 1 thread each)", 500.0, 10.0),
        ],
    ]
    got = each_turn(turns, {32: ceiling})  # type: ignore[arg-type]
    assert [round(r, 2) for r in got["throughput"]] == [1.25, 1.0, 1.11]
    assert [round(r, 2) for r in got["p99"]] == [0.4, 0.4, 1.0]
    assert [round(r, 3) for r in got["ceiling"]] == [1.25, 0.8, 0.926]
    assert [round(r, 2) for r in got["one client"]] == [0.9]
    assert each_turn({}, {}) == {"throughput": [], "p99": [], "ceiling": [], "one client": []}

    rows = [report_row(SERVICE, 1, 40.0), report_row(NAIVE, 1, 41.0)]
    rows += [report_row(SERVICE, 32, 111.0), report_row(NAIVE, 32, 100.0)]
    start = [
        OfflineResult("length-sorted batches (2 threads)", 95.0, 20.0),
        OfflineResult("one per run (2 threads)", 120.0, 16.0),
    ]
    args = report_args(tmp_path)
    report(args, [], tmp_path, machine(), rows, [], "not run", [], start, {}, 400, None, None, got)
    text = (tmp_path / "load.md").read_text()
    assert (
        "| docs/s >= 1.10x the naive server's at 32 clients | 1.11 | met | "
        "1.25 1.00 1.11 (2 of 3 met) |" in text
    )
    assert "| p99 <= 0.5x the naive server's at 32 clients | 1.00 | missed by 100% | " in text
    assert "0.40 0.40 1.00 (2 of 3 met) |" in text
    assert "1.25 0.80 0.93 (2 of 3 met) |" in text
    assert "(ours 1.0, the naive server's 1.0; their difference) | 0.00 | met | – |" in text


def test_changes_pairs_each_email_with_the_naive_servers_answer() -> None:
    from bench.changes import per_email_difference

    def turn(latencies: list[float]) -> tuple[LevelResult, float]:
        return LevelResult(1, seconds=1.0, latencies=latencies, statuses={200: 4}), 0.5

    naive = [0.010, 0.040, 0.012, 0.030]
    ours = [0.009, 0.039, 0.011, 0.035]  # three emails 1 ms quicker, one 5 ms slower
    assert per_email_difference([turn(ours)], [turn(naive)]) == -1.0
    # A turn that lost an answer is left out; none left: no figure.
    assert per_email_difference([turn(ours[:3]), turn(ours)], [turn(naive)] * 2) == -1.0
    assert per_email_difference([turn(ours[:3])], [turn(naive)]) == ""


def test_thread_roles_cpu_reads_each_threads_kernel_name() -> None:
    import os

    from bench.load import thread_cpu_ms
    from bench.loadgen import thread_roles_cpu_s
    from service.threadnames import name_this_thread

    stop = threading.Event()

    def burn(name: str) -> None:
        name_this_thread(name)
        while not stop.is_set():
            pass

    before = thread_roles_cpu_s(os.getpid())
    names = ["linmod-engine-0", "linmod-engine-1", "linmod-tokenize_0"]
    threads = [threading.Thread(target=burn, args=(n,), daemon=True) for n in names]
    for t in threads:
        t.start()
    try:
        # read while they run: the kernel forgets an ended thread's time
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            roles = thread_roles_cpu_s(os.getpid())
            if roles.get("linmod-engine", 0.0) >= 0.4 and roles.get("linmod-tokenize", 0.0) >= 0.1:
                break
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert "loop" in roles  # this thread, the process's main one
    assert roles["linmod-engine"] - before.get("linmod-engine", 0.0) >= 0.4  # both, summed
    assert roles["linmod-tokenize"] - before.get("linmod-tokenize", 0.0) >= 0.1
    per_doc = thread_cpu_ms(before, roles, docs=10)
    assert set(per_doc) == {"engine_cpu_ms", "tokenize_cpu_ms", "loop_cpu_ms", "other_cpu_ms"}
    assert per_doc["engine_cpu_ms"] >= 40.0  # >= 0.4 s over 10 documents


def test_changes_reverses_every_other_turn_and_pairs_each_turn_with_the_naive_server() -> None:
    from bench.changes import paired_ratio
    from bench.load import p99_ms, turn_order

    names = ["before", "after", "naive server"]
    assert [turn_order(names, t) for t in range(3)] == [names, names[::-1], names]

    def turn(docs_per_s: float) -> tuple[LevelResult, float]:
        return LevelResult(32, seconds=100 / docs_per_s, statuses={200: 100}), 1.0

    # Each turn's docs/s against the naive server's in that turn: 1.2, 1.1 and 0.8; a turn where
    # the naive server answered nothing has no ratio.
    ours = [turn(120.0), turn(66.0), turn(24.0)]
    naive = [turn(100.0), turn(60.0), turn(30.0)]
    assert paired_ratio(ours, naive) == 1.1
    silent = (LevelResult(32, seconds=1.0, statuses={0: 100}), 1.0)
    assert paired_ratio([*ours, turn(500.0)], [*naive, silent]) == 1.1
    assert paired_ratio([], []) == ""

    # p99 pairs the same way: 0.5, 0.4 and 0.6 -> 0.5.
    def tail(ms: float) -> tuple[LevelResult, float]:
        return LevelResult(32, seconds=1.0, latencies=[ms / 1000] * 10, statuses={200: 10}), 1.0

    assert (
        paired_ratio([tail(100), tail(80), tail(300)], [tail(200)] * 2 + [tail(500)], p99_ms) == 0.5
    )
