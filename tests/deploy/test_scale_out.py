"""Scale-out under faults: three `linmod-serve` replicas behind HAProxy (the shipped
deploy/haproxy/haproxy.cfg) share a fresh PostgreSQL schema, under interactive requests and a
20,000-line batch job. Mid-batch one replica is SIGKILLed; a second later another gets SIGTERM
and is started again, as in a rolling update. Every batch line ends exactly once, no interactive
request fails, and the killed replica's lines are taken over within one lease period.

    pytest tests/deploy/test_scale_out.py -s    # prints the figures docs/deployment.md records
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cluster import LoadBalancer, LoggedRequest, Replica
from jobs_testing import TERMINAL, TEXTS, jsonl, postgres_schema, request_line, results_of
from sqlalchemy import Engine, create_engine, text

pytestmark = pytest.mark.slow

LINES = 20_000
LEASE_S = 8.0  # short, so the takeover fits in the test; production runs 30 to 60 s
FLAGS = (
    "--job-lease-s", str(LEASE_S), "--job-poll-s", "0.05", "--job-claim-lines", "32",
    "--max-wait-ms", "5", "--tokenizer-threads", "1",
    # As docker-compose.scale.yml drains: new work taken for 3 s after SIGTERM while HAProxy's
    # checks take the replica out, then refused (and retried by HAProxy elsewhere).
    "--drain-delay-s", "3", "--drain-grace-s", "10", "--shutdown-timeout-s", "10",
)  # fmt: skip
LOAD_THREADS = 2  # interactive clients, each with one request in flight at a time


@dataclass
class Sent:
    """One interactive request as the client saw it."""

    started: float
    ended: float
    status: int | None  # None: no HTTP response at all
    error: str = ""


class InteractiveLoad:
    """Clients sending /v1/classify and /v1/moderations through the load balancer until stopped;
    each request carries an X-Request-ID, which HAProxy logs beside the replica that served it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sent: dict[str, Sent] = {}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True)
            for i in range(LOAD_THREADS)
        ]

    def __enter__(self) -> InteractiveLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _client(self, index: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            for n in itertools.count():
                if self._stop.is_set():
                    return
                rid = f"i{index}-{n}"
                route = "/v1/classify" if n % 2 else "/v1/moderations"
                body = {"input": TEXTS[(n + index) % len(TEXTS)]}
                started = time.monotonic()
                try:
                    response = client.post(route, json=body, headers={"x-request-id": rid})
                    self.sent[rid] = Sent(started, time.monotonic(), response.status_code)
                except httpx.HTTPError as exc:
                    self.sent[rid] = Sent(started, time.monotonic(), None, repr(exc))
                time.sleep(0.02)

    def in_flight_at(self, moment: float) -> int:
        return self.in_flight_between(moment, moment)

    def in_flight_between(self, begin: float, end: float) -> int:
        """Requests that were sent before `end` and had not been answered by `begin`."""
        return sum(1 for s in self.sent.values() if s.started <= end and s.ended >= begin)


def batch_file() -> tuple[bytes, list[str]]:
    """LINES moderation requests of one to four sentences, unique custom_ids."""
    ids = [f"line-{i:05d}" for i in range(LINES)]
    lines = [
        request_line(custom_id, " ".join(TEXTS[(i + k) % 4] for k in range(1 + i % 4)))
        for i, custom_id in enumerate(ids)
    ]
    return jsonl(lines), ids


def held_by(db: Engine, batch_id: str, pid: int) -> tuple[str | None, list[int], float]:
    """The worker id of process `pid`, the lines it holds claimed, and when its leases end."""
    with db.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT worker, line_no, lease_expires FROM linmod_batch_lines "
                "WHERE batch_id = :b AND state = 'claimed' AND worker LIKE :w"
            ),
            {"b": batch_id, "w": f"%:{pid}:%"},
        ).all()
    workers = {row.worker for row in rows}
    assert len(workers) <= 1, workers
    lease_end = max((row.lease_expires for row in rows), default=0.0)
    return (workers.pop() if workers else None), [row.line_no for row in rows], lease_end


def still_held(db: Engine, batch_id: str, worker: str) -> int:
    with db.connect() as conn:
        n = conn.execute(
            text(
                "SELECT count(*) FROM linmod_batch_lines "
                "WHERE batch_id = :b AND state = 'claimed' AND worker = :w"
            ),
            {"b": batch_id, "w": worker},
        ).scalar()
    return int(n or 0)


def claimed_twice(db: Engine, batch_id: str) -> int:
    with db.connect() as conn:
        n = conn.execute(
            text("SELECT count(*) FROM linmod_batch_lines WHERE batch_id = :b AND attempts > 1"),
            {"b": batch_id},
        ).scalar()
    return int(n or 0)


def table_activity(db: Engine) -> dict[str, int]:
    """Rows inserted, updated and deleted and index scans in this schema's tables, from
    PostgreSQL's own statistics (per schema, so other databases' work does not count)."""
    with db.connect() as conn:
        conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        row = conn.execute(
            text(
                "SELECT sum(n_tup_ins) AS ins, sum(n_tup_upd) AS upd, sum(n_tup_del) AS del, "
                "sum(coalesce(idx_scan, 0) + coalesce(seq_scan, 0)) AS scans "
                "FROM pg_stat_user_tables WHERE schemaname = current_schema()"
            )
        ).one()
    return {k: int(v or 0) for k, v in row._mapping.items()}


@pytest.fixture
def database_url() -> Iterator[str]:
    with postgres_schema() as url:
        yield url


def poll_batch(url: str, batch_id: str) -> dict[str, Any]:
    batch: dict[str, Any] = httpx.get(f"{url}/v1/batches/{batch_id}", timeout=30).json()
    return batch


def test_replicas_survive_a_kill_and_a_rolling_restart_under_load(
    tiny_artifact: Path, tmp_path: Path, database_url: str
) -> None:
    db = create_engine(database_url)
    replicas = [Replica(f"r{i}", tiny_artifact, database_url, tmp_path, *FLAGS) for i in (1, 2, 3)]
    killed, restarted, _ = replicas
    lb: LoadBalancer | None = None
    figures: dict[str, Any] = {}
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_ready()
        lb = LoadBalancer(replicas, tmp_path)
        content, ids = batch_file()

        with InteractiveLoad(lb.url) as load:
            began = time.monotonic()
            with httpx.Client(base_url=lb.url, timeout=120) as client:
                files = {"file": ("lines.jsonl", content, "application/jsonl")}
                uploaded = client.post("/v1/files", data={"purpose": "batch"}, files=files)
                assert uploaded.status_code == 200, uploaded.text
                body = {"input_file_id": uploaded.json()["id"], "endpoint": "/v1/moderations",
                        "completion_window": "24h"}  # fmt: skip
                created = client.post("/v1/batches", json=body)
                assert created.status_code == 200, created.text
            batch_id = created.json()["id"]

            # Mid-batch, at a moment the replica holds lines: SIGKILL one.
            deadline = time.monotonic() + 90
            batch = poll_batch(lb.url, batch_id)
            while batch["request_counts"]["completed"] < LINES // 5:
                assert time.monotonic() < deadline, f"too slow to reach a fifth: {batch}"
                time.sleep(0.1)
                batch = poll_batch(lb.url, batch_id)
            # A replica between two chunks holds nothing for a moment. So it is paused (SIGSTOP)
            # and its claims are read while it writes nothing, after a pause long enough for a
            # statement it had already sent to finish; holding none, it resumes and is tried
            # again a moment later. The read is what it held when the SIGKILL comes.
            pauses = 0
            while True:
                assert time.monotonic() < deadline + 30, "the replica never held lines"
                pauses += 1
                killing = time.monotonic()
                killed.pause()
                time.sleep(0.2)
                worker, held, lease_end = held_by(db, batch_id, killed.pid)
                if worker is not None and held:
                    break
                killed.resume()
                time.sleep(0.1)
            killed.kill()
            killed_at, killed_wall = time.monotonic(), time.time()
            figures["pauses before the kill"] = pauses
            figures["killed at"] = batch["request_counts"]
            figures["lines held by the killed replica"] = len(held)
            figures["in flight at the kill"] = load.in_flight_between(killing, killed_at)

            # A second later, with the killed replica's lines still leased: a rolling update
            # stops another replica with SIGTERM, then starts it again.
            time.sleep(1.0)
            _, term_held, _ = held_by(db, batch_id, restarted.pid)
            term_worker = held_by(db, batch_id, restarted.pid)[0]
            terminated_at = time.monotonic()
            code, drain_s = restarted.terminate(timeout=45)  # drain 10 s, shutdown 10 s
            figures["SIGTERM exit status"] = code
            figures["lines held by the SIGTERMed replica"] = len(term_held)
            figures["in flight at the SIGTERM"] = load.in_flight_at(terminated_at)
            figures["SIGTERM to exit, s"] = round(drain_s, 2)
            if term_worker is not None:
                left = still_held(db, batch_id, term_worker)
                figures["lines it still held after exiting"] = left

            # The killed replica's leases lapse; another replica claims its lines.
            takeover_s = None
            while time.monotonic() < killed_at + 4 * LEASE_S:
                if still_held(db, batch_id, worker) == 0:
                    takeover_s = time.monotonic() - killed_at
                    break
                time.sleep(0.05)
            figures["lease left at the kill, s"] = round(lease_end - killed_wall, 2)
            figures["kill to takeover, s"] = takeover_s and round(takeover_s, 2)

            restarted.start()
            restarted.wait_ready()
            figures["restart to ready, s"] = round(time.monotonic() - terminated_at - drain_s, 1)

            deadline = time.monotonic() + 150
            while batch["status"] not in TERMINAL:
                figures["batch"] = batch["request_counts"]
                assert time.monotonic() < deadline, f"the batch did not finish: {batch}"
                time.sleep(0.2)
                batch = poll_batch(lb.url, batch_id)
            figures["batch took, s"] = round(time.monotonic() - began, 1)
            time.sleep(1.0)  # interactive load on the two survivors for a moment more

        assert batch["status"] == "completed", batch
        lines = results_of(lb.url, batch)
        seen = Counter(line["custom_id"] for line in lines)
        lost = set(ids) - set(seen)
        doubled = {k: n for k, n in seen.items() if n > 1}
        figures["batch"] = batch["request_counts"]
        figures["batch lines lost"] = len(lost)
        figures["batch lines doubled"] = len(doubled)
        figures["lines claimed twice"] = claimed_twice(db, batch_id)

        logged = lb.requests()
        failed = {rid: s for rid, s in load.sent.items() if s.status != 200}
        by_server = Counter(logged[rid].server if rid in logged else "?" for rid in failed)
        figures["interactive requests"] = len(load.sent)
        figures["interactive failed"] = len(failed)
        figures["interactive failed by replica"] = dict(by_server)
        served = Counter(logged[rid].server for rid in load.sent if rid in logged)
        figures["interactive served by replica"] = dict(sorted(served.items()))
        retried = [r for rid, r in logged.items() if rid in load.sent and r.retries]
        figures["interactive retried by HAProxy"] = len(retried)
        figures["of those, sent to another replica"] = sum(r.redispatched for r in retried)

        for replica in replicas:
            replica.stop()
        activity = table_activity(db)
        figures["rows written per line"] = round(
            (activity["ins"] + activity["upd"] + activity["del"]) / LINES, 2
        )
        figures["table scans per line"] = round(activity["scans"] / LINES, 2)

        assert figures["SIGTERM exit status"] == 0, "the SIGTERMed replica did not drain in time"
        # Every line exactly once; the SIGTERMed replica handed its lines back rather than
        # leaving them to lapse.
        assert not lost and not doubled, (sorted(lost)[:5], list(doubled)[:5])
        assert batch["request_counts"] == {"total": LINES, "completed": LINES, "failed": 0}
        # Every line the killed replica held was claimed again. On a loaded machine a live
        # replica's lease can lapse too (its heartbeat skips rows its writer holds locked), and
        # a survivor takes those lines at once: claimed twice, written once.
        assert figures["lines claimed twice"] >= len(held), figures
        assert figures.get("lines it still held after exiting", 0) == 0, figures
        # Taken over within one lease period of the kill: the claims lapse at most one lease
        # after the dead replica's last heartbeat, and the survivors take lapsed lines at their
        # next poll even when they have no room for new ones (allowed two seconds on a loaded
        # machine).
        assert lease_end - killed_wall <= LEASE_S, figures
        assert takeover_s is not None, figures
        figures["lapse to takeover, s"] = round(takeover_s - (lease_end - killed_wall), 2)
        assert takeover_s <= (lease_end - killed_wall) + 2.0, figures
        # No interactive request failed because of the SIGTERM or on a surviving replica. A
        # failure is one in flight on the killed replica when it died: HAProxy logged it there,
        # or did not log it at all (a request cut off on a dead server may end unlogged).
        assert set(by_server) <= {killed.name, "?"}, failed
        in_flight_at_kill = [
            s for s in failed.values() if s.started <= killed_at and s.ended >= killing
        ]
        assert len(in_flight_at_kill) == len(failed), failed
    finally:
        print("\n" + json.dumps(figures, indent=2, default=str))  # what was measured, pass or fail
        if lb is not None:
            lb.stop()
        for replica in replicas:
            replica.stop()
        db.dispose()


def test_the_log_reader_reads_haproxys_httplog() -> None:
    line = (
        "127.0.0.1:41234 [02/Dec/2026:04:30:00.123] linmod linmod/r2 0/0/1/5/6 200 345 - - "
        '---- 4/4/3/1/+1 0/0 {i0-12} "POST /v1/classify HTTP/1.1"'
    )
    logged = LoggedRequest.parse(line)
    assert logged == LoggedRequest("r2", 200, 1, True, "--", "i0-12", "POST /v1/classify HTTP/1.1")
    refused = line.replace("linmod/r2", "linmod/<NOSRV>").replace(" 200 ", " 503 ")
    parsed = LoggedRequest.parse(refused)
    assert parsed is not None and parsed.server == "<NOSRV>" and parsed.status == 503
