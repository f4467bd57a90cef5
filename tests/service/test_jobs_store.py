"""The job store, the same tests on SQLite and on PostgreSQL: files, batches, validation, leased
claims, takeover, exactly-once results and finalization, cancelling, expiry and retention.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from jobs_testing import jsonl, postgres_schema, request_line
from sqlalchemy import select

from service.jobs.claims import MAX_ATTEMPTS, LineClaims, LineResult
from service.jobs.db import Database, batch_lines, files
from service.jobs.lifecycle import BatchLifecycle
from service.jobs.records import StateConflictError, UnknownObjectError, WrongFileError
from service.jobs.store import JobStore

LEASE = 10.0
DAY = 24 * 3600.0


class Clock:
    """Time that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
        database.create_schema()
        yield database
        database.close()
        return
    with postgres_schema() as url:
        database = Database(url)
        database.create_schema()
        yield database
        database.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(db: Database, clock: Clock) -> JobStore:
    return JobStore(db, clock=clock)


@pytest.fixture
def claims(db: Database, clock: Clock) -> LineClaims:
    return LineClaims(db, clock=clock)


@pytest.fixture
def life(db: Database, clock: Clock) -> BatchLifecycle:
    return BatchLifecycle(db, retention_s=30 * DAY, clock=clock)


def put_file(store: JobStore, content: bytes, owner: str | None = None) -> str:
    """Store a file as an upload would: its lines in two transactions."""
    lines = content.decode().splitlines(keepends=True)
    file_id, _ = store.begin_file(owner, "requests.jsonl")
    numbered = list(enumerate(lines, start=1))
    store.add_lines(file_id, numbered[:2])
    store.add_lines(file_id, numbered[2:])
    requests = sum(1 for line in lines if line.strip())
    store.complete_file(file_id, size=len(content), lines=requests, ttl_s=30 * DAY)
    return file_id


def content_of(store: JobStore, file_id: str, owner: str | None = None, page: int = 3) -> str:
    record = store.get_file(file_id, owner)
    text, after = "", 0
    while chunk := store.read_content(record, after, page):
        after = chunk[-1][0]
        text += "".join(t for _, t in chunk)
    return text


def make_batch(
    store: JobStore,
    life: BatchLifecycle,
    n: int,
    owner: str | None = None,
    extra: tuple[object, ...] = (),
) -> str:
    """A validated batch of n good lines (and any extra lines)."""
    file_id = put_file(
        store, jsonl([request_line(f"r{i}", f"text {i}") for i in range(n)] + [*extra])
    )
    batch = store.create_batch(
        owner, input_file_id=file_id, endpoint="/v1/moderations", completion_window="24h",
        window_s=DAY, metadata={"team": "mail"}, model="m",
    )  # fmt: skip
    assert life.claim_batch(batch.id, "validating", "v", LEASE)
    assert life.validate(batch.id, "v") is not None
    return batch.id


def ok(line: object) -> str:
    return json.dumps({"custom_id": str(line)})


def results_for(lines: list[object], succeeded: bool = True) -> list[LineResult]:
    return [LineResult(x.batch_id, x.line_no, succeeded, ok(x.custom_id)) for x in lines]  # type: ignore[attr-defined]


def test_a_file_keeps_its_exact_bytes_and_its_owner(store: JobStore) -> None:
    content = jsonl([request_line("a", "héllo"), "", request_line("b", "x")]) + b'{"last": 1}'
    file_id = put_file(store, content, owner="k1")
    record = store.get_file(file_id, "k1")
    assert (record.bytes, record.lines, record.purpose, record.kind) == (
        len(content),
        3,
        "batch",
        "input",
    )
    assert content_of(store, file_id, "k1").encode() == content
    for other in ("k2", None):
        with pytest.raises(UnknownObjectError):
            store.get_file(file_id, other)
        with pytest.raises(UnknownObjectError):
            store.delete_file(file_id, other)
    store.delete_file(file_id, "k1")
    with pytest.raises(UnknownObjectError):
        store.get_file(file_id, "k1")


def test_an_unfinished_upload_is_invisible_and_discarding_leaves_nothing(
    store: JobStore, db: Database
) -> None:
    file_id, _ = store.begin_file(None, "partial.jsonl")
    store.add_lines(file_id, [(1, "{}\n")])
    with pytest.raises(UnknownObjectError):
        store.get_file(file_id, None)
    store.discard_file(file_id)
    with db.read() as conn:
        assert conn.execute(select(files.c.id)).all() == []


def test_batches_list_newest_first_per_owner(store: JobStore, life: BatchLifecycle) -> None:
    file_id = put_file(store, jsonl([request_line("a", "x")]), owner="k1")
    made = [
        store.create_batch(
            "k1", input_file_id=file_id, endpoint="/v1/classify", completion_window="24h",
            window_s=DAY, metadata=None, model="m",
        ).id
        for _ in range(5)
    ]  # fmt: skip
    page, more = store.list_batches("k1", after=None, limit=2)
    assert [b.id for b in page] == made[::-1][:2] and more
    page, more = store.list_batches("k1", after=page[-1].id, limit=10)
    assert [b.id for b in page] == made[::-1][2:] and not more
    assert store.list_batches("k2", after=None, limit=10) == ([], False)
    with pytest.raises(UnknownObjectError):
        store.get_batch(made[0], "k2")
    with pytest.raises(UnknownObjectError):
        store.list_batches("k2", after=made[0], limit=10)
    with pytest.raises(UnknownObjectError):  # another key's file
        store.create_batch(
            "k2", input_file_id=file_id, endpoint="/v1/classify", completion_window="24h",
            window_s=DAY, metadata=None, model="m",
        )  # fmt: skip
    batch = store.get_batch(made[0], "k1")
    assert (batch.status, batch.total, batch.endpoint) == ("validating", 1, "/v1/classify")


def test_validation_sends_bad_lines_to_the_error_file(
    store: JobStore, life: BatchLifecycle, db: Database
) -> None:
    extra: list[object] = [
        "{not json",
        "[1, 2]",
        {"method": "POST", "url": "/v1/moderations", "body": {"input": "no id"}},
        request_line("r0", "a repeated custom_id"),
        request_line("c1", "to the wrong endpoint", url="/v1/classify"),
        request_line("c2", "to no endpoint", url="/v1/chat/completions"),
        {"custom_id": "c3", "method": "GET", "url": "/v1/moderations", "body": {}},
        {"custom_id": "c4", "method": "POST", "url": "/v1/moderations"},
        "   ",
    ]
    batch_id = make_batch(store, life, 3, extra=tuple(extra))
    batch = store.get_batch(batch_id, None)
    assert (batch.status, batch.total, batch.completed, batch.failed) == ("in_progress", 11, 0, 8)
    with db.read() as conn:
        rows = conn.execute(
            select(batch_lines.c.custom_id, batch_lines.c.state, batch_lines.c.result)
            .where(batch_lines.c.batch_id == batch_id)
            .order_by(batch_lines.c.line_no)
        ).all()
    codes = [json.loads(r.result)["error"]["code"] for r in rows if r.state == "done"]
    assert codes == [
        "invalid_json_line", "invalid_json_line", "missing_custom_id", "duplicate_custom_id",
        "invalid_url", "invalid_url", "invalid_method", "missing_body",
    ]  # fmt: skip
    assert [r.custom_id for r in rows if r.state == "pending"] == ["r0", "r1", "r2"]


def test_a_full_worker_takes_only_lapsed_lines(
    store: JobStore, life: BatchLifecycle, claims: LineClaims, clock: Clock
) -> None:
    batch_id = make_batch(store, life, 10)
    a, _ = claims.claim_lines("A", [batch_id], 3, LEASE)
    # Nothing has lapsed: a worker without room takes nothing, pending lines stay for others.
    assert claims.claim_lines("B", [batch_id], 5, LEASE, lapsed_only=True) == ([], 0)
    clock.now += LEASE + 1  # A has died
    # A's own lapsed lines are still A's to finish: its lapsed-only pass leaves them.
    assert claims.claim_lines("A", [batch_id], 5, LEASE, lapsed_only=True) == ([], 0)
    taken, _ = claims.claim_lines("B", [batch_id], 5, LEASE, lapsed_only=True)
    assert [x.line_no for x in taken] == [x.line_no for x in a]
    rest, _ = claims.claim_lines("C", [batch_id], 10, LEASE)
    assert {x.line_no for x in rest}.isdisjoint(x.line_no for x in taken) and len(rest) == 7


def test_claims_are_disjoint_and_a_lapsed_lease_is_taken_over(
    store: JobStore, life: BatchLifecycle, claims: LineClaims, clock: Clock
) -> None:
    batch_id = make_batch(store, life, 10)
    a, _ = claims.claim_lines("A", [batch_id], 4, LEASE)
    b, _ = claims.claim_lines("B", [batch_id], 4, LEASE)
    assert {x.line_no for x in a}.isdisjoint(x.line_no for x in b) and len(a) == len(b) == 4
    assert len(claims.write_results("B", results_for(b))) == 4
    clock.now += LEASE + 1  # A has died: its lease lapses
    c, _ = claims.claim_lines("C", [batch_id], 10, LEASE)
    assert {x.line_no for x in c} == {x.line_no for x in a} | {9, 10}
    # A comes back late: its results are dropped, not doubled.
    assert claims.write_results("A", results_for(a)) == []
    assert len(claims.write_results("C", results_for(c, succeeded=False))) == 6
    assert not claims.claim_lines("D", [batch_id], 10, LEASE)[0]
    batch = store.get_batch(batch_id, None)
    assert (batch.completed, batch.failed, batch.total) == (4, 6, 10)
    assert life.finalize(batch_id, "B", LEASE) and not life.finalize(batch_id, "C", LEASE)
    batch = store.get_batch(batch_id, None)
    assert batch.status == "completed" and batch.output_file_id and batch.error_file_id
    output = content_of(store, batch.output_file_id).splitlines()
    errors = content_of(store, batch.error_file_id).splitlines()
    assert sorted(output + errors) == sorted(ok(f"r{i}") for i in range(10))
    assert store.get_file(batch.output_file_id, None).bytes == sum(len(x) + 1 for x in output)
    with pytest.raises(WrongFileError):
        store.create_batch(
            None, input_file_id=batch.output_file_id, endpoint="/v1/moderations",
            completion_window="24h", window_s=DAY, metadata=None, model="m",
        )  # fmt: skip
    with pytest.raises(StateConflictError):
        store.cancel_batch(batch_id, None)


def test_concurrent_workers_finish_a_batch_exactly_once(
    store: JobStore, life: BatchLifecycle, claims: LineClaims
) -> None:
    batch_id = make_batch(store, life, 300)
    done: dict[str, list[int]] = {}
    finalized: list[str] = []

    def work(worker: str) -> None:
        mine = done.setdefault(worker, [])
        while True:
            lines, _ = claims.claim_lines(worker, [batch_id], 7, LEASE)
            if not lines:
                break
            mine += [r.line_no for r in claims.write_results(worker, results_for(lines))]
        if life.finalize(batch_id, worker, LEASE):
            finalized.append(worker)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    written = [n for lines in done.values() for n in lines]
    assert sorted(written) == list(range(1, 301))  # every line once, none twice
    assert len(finalized) == 1
    batch = store.get_batch(batch_id, None)
    assert (batch.status, batch.completed, batch.failed) == ("completed", 300, 0)


def test_finalizing_is_taken_over_when_its_worker_dies(
    store: JobStore, life: BatchLifecycle, claims: LineClaims, clock: Clock
) -> None:
    batch_id = make_batch(store, life, 2)
    lines, _ = claims.claim_lines("A", [batch_id], 2, LEASE)
    claims.write_results("A", results_for(lines))
    assert life.begin_finalizing(batch_id, "A", LEASE)  # ...and A dies here
    assert store.get_batch(batch_id, None).status == "finalizing"
    assert not life.claim_batch(batch_id, "finalizing", "B", LEASE)  # A's lease still holds
    clock.now += LEASE + 1
    assert life.claim_batch(batch_id, "finalizing", "B", LEASE)
    assert life.complete(batch_id, "B") and not life.complete(batch_id, "A")
    assert store.get_batch(batch_id, None).status == "completed"


def test_a_line_whose_workers_keep_dying_fails(
    store: JobStore, life: BatchLifecycle, claims: LineClaims, clock: Clock
) -> None:
    batch_id = make_batch(store, life, 1)
    for attempt in range(MAX_ATTEMPTS):
        lines, failed = claims.claim_lines(f"w{attempt}", [batch_id], 1, LEASE)
        assert len(lines) == 1 and failed == 0
        clock.now += LEASE + 1
    lines, failed = claims.claim_lines("last", [batch_id], 1, LEASE)
    assert lines == [] and failed == 1
    assert life.finalize(batch_id, "last", LEASE)
    batch = store.get_batch(batch_id, None)
    assert batch.failed == 1 and batch.error_file_id
    (line,) = content_of(store, batch.error_file_id).splitlines()
    assert json.loads(line)["error"]["code"] == "too_many_attempts"


def test_released_lines_are_claimed_again_at_once(
    store: JobStore, life: BatchLifecycle, claims: LineClaims
) -> None:
    batch_id = make_batch(store, life, 3)
    lines, _ = claims.claim_lines("A", [batch_id], 3, LEASE)
    claims.release("A", [(x.batch_id, x.line_no) for x in lines])
    again, _ = claims.claim_lines("B", [batch_id], 3, LEASE)
    assert [x.line_no for x in again] == [x.line_no for x in lines]


def test_cancelling_waits_for_live_leases_then_fails_the_rest(
    store: JobStore, life: BatchLifecycle, claims: LineClaims
) -> None:
    batch_id = make_batch(store, life, 5)
    lines, _ = claims.claim_lines("A", [batch_id], 2, LEASE)
    assert store.cancel_batch(batch_id, None).status == "cancelling"
    assert store.cancel_batch(batch_id, None).status == "cancelling"  # idempotent
    assert not claims.claim_lines("B", [batch_id], 5, LEASE)[0]  # no new claims
    assert life.finish_cancelled(batch_id) is None  # A still runs two lines
    claims.write_results("A", results_for(lines))
    assert life.finish_cancelled(batch_id) == 3
    assert life.finish_cancelled(batch_id) is None  # exactly once
    batch = store.get_batch(batch_id, None)
    assert (batch.status, batch.completed, batch.failed, batch.total) == ("cancelled", 2, 3, 5)
    assert batch.cancelled_at is not None and batch.error_file_id
    errors = [json.loads(x) for x in content_of(store, batch.error_file_id).splitlines()]
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert {e["custom_id"] for e in errors} == {"r2", "r3", "r4"}


def test_a_batch_cancelled_while_validating_never_runs(
    store: JobStore, life: BatchLifecycle
) -> None:
    file_id = put_file(store, jsonl([request_line("a", "x")]))
    batch = store.create_batch(
        None, input_file_id=file_id, endpoint="/v1/moderations", completion_window="24h",
        window_s=DAY, metadata=None, model="m",
    )  # fmt: skip
    assert life.claim_batch(batch.id, "validating", "v", LEASE)
    store.cancel_batch(batch.id, None)
    assert life.validate(batch.id, "v") is None
    assert life.finish_cancelled(batch.id) == 0
    batch = store.get_batch(batch.id, None)
    assert (batch.status, batch.total, batch.output_file_id, batch.error_file_id) == (
        "cancelled", 0, None, None,
    )  # fmt: skip


def test_a_deleted_input_file_fails_the_batch(store: JobStore, life: BatchLifecycle) -> None:
    file_id = put_file(store, jsonl([request_line("a", "x")]))
    batch = store.create_batch(
        None, input_file_id=file_id, endpoint="/v1/moderations", completion_window="24h",
        window_s=DAY, metadata=None, model="m",
    )  # fmt: skip
    store.delete_file(file_id, None)
    assert life.claim_batch(batch.id, "validating", "v", LEASE)
    assert life.validate(batch.id, "v") == 0
    batch = store.get_batch(batch.id, None)
    assert batch.status == "failed" and batch.failed_at is not None
    assert json.loads(batch.errors or "")[0]["code"] == "input_file_not_found"


def test_expiry_then_retention(
    store: JobStore, life: BatchLifecycle, claims: LineClaims, clock: Clock, db: Database
) -> None:
    batch_id = make_batch(store, life, 4)
    lines, _ = claims.claim_lines("A", [batch_id], 1, LEASE)
    claims.write_results("A", results_for(lines))
    assert life.expire(batch_id) is None  # not due
    clock.now += DAY + 1
    assert life.expire(batch_id) == 3 and life.expire(batch_id) is None
    batch = store.get_batch(batch_id, None)
    assert (batch.status, batch.completed, batch.failed) == ("expired", 1, 3)
    codes = {
        json.loads(x)["error"]["code"]
        for x in content_of(store, batch.error_file_id or "").splitlines()
    }
    assert codes == {"batch_expired"}
    assert life.cleanup() == {"files": 0, "batches": 0}
    clock.now += 30 * DAY + 1
    assert life.cleanup() == {"files": 3, "batches": 1}  # the input, output and error files
    with pytest.raises(UnknownObjectError):
        store.get_batch(batch_id, None)
    with db.read() as conn:
        assert conn.execute(select(batch_lines.c.line_no)).all() == []
        assert conn.execute(select(files.c.id)).all() == []
