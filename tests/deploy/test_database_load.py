"""What a batch line costs PostgreSQL: every statement the service sends while an app (the fake
engine, the real batch-job worker and store, a fresh PostgreSQL schema) takes a batch from
upload to download, counted with SQLAlchemy's cursor and commit events. docs/capacity.md turns
the figures into the database load per 1,000 lines/s.

    pytest tests/deploy/test_database_load.py -s    # prints the table
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from jobs_testing import TEXTS, jsonl, postgres_schema, request_line, upload, wait_for
from service_testing import FAKE_CONFIG, make_settings, serving, train_tokenizer
from sqlalchemy import Engine, event

from service.app import create_app
from service.artifact import ArtifactConfig
from service.engine import FakeEngine

LINES = 2_000
TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE)\s+(linmod_\w+)", re.IGNORECASE)


class StatementCounter:
    """Statements as PostgreSQL executes them: an executemany of n parameter sets is n
    statements (psycopg pipelines them in one round trip), counted by verb and table."""

    def __init__(self) -> None:
        self.statements: Counter[str] = Counter()
        self.round_trips = 0
        self.commits = 0

    def total(self) -> int:
        return sum(self.statements.values())

    def _cursor(self, conn: Any, cursor: Any, sql: str, params: Any, ctx: Any, many: bool) -> None:
        n = len(params) if many and params else 1
        verb = sql.lstrip().split(None, 1)[0].upper()
        if verb == "SELECT" and "FOR UPDATE" in sql.upper():
            verb = "SELECT FOR UPDATE"
        table = TABLE.search(sql)
        self.statements[f"{verb} {table.group(1) if table else ''}".strip()] += n
        self.round_trips += 1

    def _commit(self, conn: Any) -> None:
        self.commits += 1

    @contextmanager
    def counting(self) -> Iterator[StatementCounter]:
        event.listen(Engine, "before_cursor_execute", self._cursor)
        event.listen(Engine, "commit", self._commit)
        try:
            yield self
        finally:
            event.remove(Engine, "before_cursor_execute", self._cursor)
            event.remove(Engine, "commit", self._commit)


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    """A model directory for the fake engine: config.json and a tiny tokenizer."""
    (tmp_path / "config.json").write_text(json.dumps(FAKE_CONFIG))
    train_tokenizer().save(str(tmp_path / "tokenizer.json"))
    return tmp_path


async def test_statements_per_batch_line_on_postgresql(artifact: Path) -> None:
    content = jsonl([request_line(f"l{i}", TEXTS[i % 4]) for i in range(LINES)])
    phases: dict[str, StatementCounter] = {}
    with postgres_schema() as url:
        settings = make_settings(artifact, database_url=url, job_poll_s=0.05)
        app = create_app(settings, engine=FakeEngine(ArtifactConfig.model_validate(FAKE_CONFIG)))
        async with serving(app) as client:
            with StatementCounter().counting() as phases["upload"]:
                uploaded = await upload(client, content)
            assert uploaded.status_code == 200, uploaded.text
            with StatementCounter().counting() as phases["run"]:
                body = {"input_file_id": uploaded.json()["id"], "endpoint": "/v1/moderations",
                        "completion_window": "24h"}  # fmt: skip
                created = await client.post("/v1/batches", json=body)
                batch = await wait_for(client, created.json()["id"], attempts=6000)
            assert batch["request_counts"] == {"total": LINES, "completed": LINES, "failed": 0}
            with StatementCounter().counting() as phases["download"]:
                output = await client.get(f"/v1/files/{batch['output_file_id']}/content")
            assert output.status_code == 200 and output.text.count("\n") == LINES

    print(f"\nPostgreSQL work per batch line ({LINES} lines, the worker's default settings):")
    print(f"{'phase':<10}{'statements':>12}{'round trips':>13}{'commits':>9}")
    for name, c in phases.items():
        print(f"{name:<10}{c.total() / LINES:>12.3f}{c.round_trips / LINES:>13.3f}"
              f"{c.commits / LINES:>9.3f}")  # fmt: skip
    everything: Counter[str] = sum((c.statements for c in phases.values()), Counter())
    for kind, n in everything.most_common():
        print(f"  {kind:<45}{n / LINES:>8.3f} per line")

    # A line is inserted once at upload, claimed in chunks, written once with its result and
    # read once for the output file: about four statements, never a query per line per poll.
    per_line = sum(c.total() for c in phases.values()) / LINES
    assert per_line < 6, everything
    assert phases["run"].commits / LINES < 0.5, phases["run"].commits  # results share commits
