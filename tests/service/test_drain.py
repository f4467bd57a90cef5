"""Graceful drain: in process, the order of its steps; on two real server processes sharing a
job store, SIGTERM under interactive load and a running batch loses no accepted request, and the
other replica finishes the batch with every line exactly once.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from jobs_testing import TERMINAL, JobServer, poll, results_of, run_to_end
from service_testing import ControlledEngine, make_settings, serving, until
from sqlalchemy import create_engine, text
from test_jobs_servers import assert_exactly_once, batch_file

from service.app import create_app
from service.artifact import ArtifactConfig
from service.drain import drain
from service.state import get_state


async def test_drain_refuses_new_work_and_waits_for_what_is_in_flight(
    fake_artifact: Path, model_config: ArtifactConfig
) -> None:
    engine = ControlledEngine(model_config)
    app = create_app(make_settings(fake_artifact, drain_grace_s=10), engine=engine)
    async with serving(app) as client:
        state = get_state(app)
        engine.gate.clear()
        in_flight = asyncio.create_task(client.post("/v1/classify", json={"input": "slow"}))
        assert await asyncio.to_thread(engine.entered.acquire, timeout=5)
        draining = asyncio.create_task(drain(state))
        await until(lambda: state.refusing)
        assert (await client.get("/ready")).status_code == 503
        read = await client.get("/v1/batches")
        assert read.status_code == 200 and read.headers["connection"] == "close"
        refused = await client.post("/v1/classify", json={"input": "new"})
        assert refused.status_code == 503 and refused.headers["connection"] == "close"
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "shutting_down"
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/v1/batches")).status_code == 200  # reads still answer
        assert not draining.done()  # waits for the request in flight
        engine.gate.set()
        assert (await in_flight).status_code == 200
        await asyncio.wait_for(draining, 5)


async def test_the_grace_period_bounds_the_wait(
    fake_artifact: Path, model_config: ArtifactConfig
) -> None:
    engine = ControlledEngine(model_config)
    app = create_app(make_settings(fake_artifact, drain_grace_s=0.2), engine=engine)
    async with serving(app) as client:
        engine.gate.clear()
        stuck = asyncio.create_task(client.post("/v1/classify", json={"input": "stuck"}))
        assert await asyncio.to_thread(engine.entered.acquire, timeout=5)
        await asyncio.wait_for(drain(get_state(app)), 5)
        engine.gate.set()
        await stuck


def lines_held(url: str, pid: int) -> int:
    """Batch lines still claimed by a worker of the process `pid`."""
    engine = create_engine(url)
    with engine.connect() as conn:
        held = conn.execute(
            text(
                "SELECT count(*) FROM linmod_batch_lines WHERE state = 'claimed' AND worker LIKE :w"
            ),
            {"w": f"%:{pid}:%"},
        ).scalar()
    engine.dispose()
    return int(held or 0)


@pytest.mark.slow
def test_sigterm_under_load_loses_nothing(tiny_artifact: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    # A long lease: if the drained replica did not hand its lines back, the batch would stall.
    flags = ("--job-lease-s", "300", "--job-poll-s", "0.05", "--job-claim-lines", "16",
             "--drain-grace-s", "20", "--drain-delay-s", "3")  # fmt: skip
    a = JobServer(tiny_artifact, tmp_path / "a.log", url, *flags)
    b = JobServer(tiny_artifact, tmp_path / "b.log", url, *flags)
    try:
        content, ids, failing = batch_file(2000)
        batch_id = run_to_end(a.url, content)
        poll(a.url, batch_id, lambda x: x["request_counts"]["completed"] >= 100, timeout=300)

        outcomes: Counter[str] = Counter()
        stop = threading.Event()

        def client(n: int) -> None:
            with httpx.Client(base_url=a.url, timeout=60) as http:
                i = 0
                while not stop.is_set():
                    i += 1
                    words = "Win a free prize now! Meeting moved to Thursday. " * (1 + (i + n) % 40)
                    try:
                        r = http.post("/v1/moderations", json={"input": words})
                    except httpx.ConnectError:
                        outcomes["not accepted: connection refused"] += 1
                        time.sleep(0.01)
                        continue
                    except httpx.HTTPError as exc:
                        outcomes[f"FAILED after acceptance: {type(exc).__name__}"] += 1
                        continue
                    if r.status_code == 200:
                        outcomes["ok"] += 1
                    elif r.status_code == 503 and r.json()["error"]["code"] == "shutting_down":
                        outcomes["not accepted: 503 shutting_down"] += 1
                    else:
                        outcomes[f"FAILED after acceptance: {r.status_code}"] += 1

        threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        time.sleep(2)
        before = dict(outcomes)
        a.proc.send_signal(signal.SIGTERM)
        ready = httpx.get(f"{a.url}/ready", timeout=5)
        assert ready.status_code == 503, ready.text
        # The clients now act as a load balancer does on a failed readiness check: no new
        # requests to this replica (the drain delay is that window). Requests already sent,
        # queued or running, must all be answered before the process exits.
        stop.set()
        exit_code = a.proc.wait(timeout=60)
        for t in threads:
            t.join()
        held_after_exit = lines_held(url, a.proc.pid)

        batch = poll(b.url, batch_id, lambda x: x["status"] in TERMINAL, timeout=600)
        assert batch["status"] == "completed", batch
        assert batch["request_counts"] == {
            "total": 2000,
            "completed": 2000 - failing,
            "failed": failing,
        }
        lines = results_of(b.url, batch)
        assert len(lines) == 2000
        assert_exactly_once(lines, ids)
        failed = {k: v for k, v in outcomes.items() if k.startswith("FAILED")}
        print(
            f"\ninteractive before SIGTERM {before}, in all {dict(outcomes)}; replica exit code "
            f"{exit_code}; lines it still held after exit {held_after_exit}; batch "
            f"{batch['request_counts']} completed on the other replica, each line once"
        )
        assert not failed and outcomes["ok"] > 0, dict(outcomes)
        assert exit_code == 0 and held_after_exit == 0
    finally:
        for server in (a, b):
            server.stop()
