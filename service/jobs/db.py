"""The batch-job tables and the database they live in: SQLite (WAL) embedded by default,
PostgreSQL when several replicas share jobs. Blocking calls run on the store's own threads.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    make_url,
    text,
)
from sqlalchemy.pool import StaticPool

from service.threadnames import name_this_thread

T = TypeVar("T")

metadata = MetaData()

# Uploaded input files and the output and error files of finished batches. The content of an
# input file is its rows in file_lines; that of an output or error file is its batch's results.
files = Table(
    "linmod_files",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),  # orders listings
    Column("id", String(64), nullable=False, unique=True),
    Column("owner", String(64)),  # the API key id that made it; NULL without keys
    Column("purpose", String(32), nullable=False),  # batch | batch_output
    Column("kind", String(8), nullable=False),  # input | output | error
    Column("filename", Text, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("lines", Integer, nullable=False),  # requests (non-blank lines)
    Column("status", String(16), nullable=False),  # uploading | processed
    Column("batch_id", String(64)),  # the batch an output or error file belongs to
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float),
)

# Every physical line of an input file as uploaded, terminator included, so content is exact.
file_lines = Table(
    "linmod_file_lines",
    metadata,
    Column("file_id", String(64), primary_key=True),
    Column("line_no", Integer, primary_key=True),  # 1-based, as an editor shows it
    Column("text", Text, nullable=False),
)

batches = Table(
    "linmod_batches",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("owner", String(64)),
    Column("endpoint", String(64), nullable=False),
    Column("input_file_id", String(64), nullable=False),
    Column("completion_window", String(16), nullable=False),
    Column("metadata", Text),  # JSON object
    Column("model", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("errors", Text),  # JSON list of {code, message, param, line}
    Column("total", Integer, nullable=False, default=0),
    Column("completed", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("output_file_id", String(64)),
    Column("error_file_id", String(64)),
    Column("output_ttl_s", Float),  # output_expires_after, if the client set one
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("in_progress_at", Float),
    Column("finalizing_at", Float),
    Column("completed_at", Float),
    Column("failed_at", Float),
    Column("expired_at", Float),
    Column("cancelling_at", Float),
    Column("cancelled_at", Float),
    Column("ended_at", Float),  # the terminal time, for retention
    # Who validates or finalizes it, until when: one replica does each, another takes over.
    Column("worker", String(64)),
    Column("lease_expires", Float),
    Index("ix_linmod_batches_status", "status"),
)

# One row per request of a batch: its parsed body while it waits, its result once done.
batch_lines = Table(
    "linmod_batch_lines",
    metadata,
    Column("batch_id", String(64), primary_key=True),
    Column("line_no", Integer, primary_key=True),
    Column("custom_id", Text),
    Column("body", Text),  # the request body as JSON; dropped once the line is done
    Column("state", String(8), nullable=False),  # pending | claimed | done
    Column("worker", String(64)),  # the claimant, then the one that wrote the result
    Column("lease_expires", Float),
    Column("attempts", Integer, nullable=False, default=0),
    Column("outcome", String(10)),  # succeeded | failed
    Column("result", Text),  # the output or error line, without its newline
    Column("result_bytes", Integer),
    Index("ix_linmod_batch_lines_state", "batch_id", "state", "outcome"),  # counts too
    Index("ix_linmod_batch_lines_worker", "worker", "state"),
)

_SCHEMA_LOCK = 0x6C696E6D6F64  # PostgreSQL advisory lock while replicas create the tables


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # SQLAlchemy emits BEGIN itself (see _sqlite_begin), so sqlite3 must not.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    # A writer takes the write lock at BEGIN, so two processes can never both read a line as
    # claimable and then both claim it; readers keep WAL's lock-free snapshots.
    reading = conn.get_execution_options().get("linmod_read", False)
    conn.exec_driver_sql("BEGIN" if reading else "BEGIN IMMEDIATE")


class Database:
    """An engine for the job tables, and threads that run blocking calls on it."""

    def __init__(self, url: str, *, threads: int = 4) -> None:
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            memory = parsed.database in (None, "", ":memory:")
            # One connection for a memory database (each would be its own database), and one
            # thread: SQLite has a single writer anyway.
            options: dict[str, Any] = (
                {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
                if memory
                else {}
            )
            self.engine = create_engine(parsed, **options)
            event.listen(self.engine, "connect", _sqlite_connect)
            event.listen(self.engine, "begin", _sqlite_begin)
            threads = 1
        elif self.dialect == "postgresql":
            self.engine = create_engine(
                parsed, pool_size=threads, max_overflow=0, pool_pre_ping=True
            )
        else:
            raise ValueError(f"unsupported database {self.dialect!r}: use sqlite or postgresql")
        self._executor = ThreadPoolExecutor(
            threads, thread_name_prefix="linmod-db", initializer=name_this_thread
        )

    @property
    def url(self) -> str:
        """The URL without its password."""
        return self.engine.url.render_as_string(hide_password=True)

    def create_schema(self) -> None:
        """Create the tables that are missing (replicas starting together take turns)."""
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
            metadata.create_all(conn)

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A transaction that may write; committed on leaving, rolled back on an error."""
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction (one consistent snapshot)."""
        with self.engine.connect() as conn:
            conn.execution_options(linmod_read=True)
            with conn.begin():
                yield conn

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking store call on the database threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        """Wait for running calls, then close every connection."""
        self._executor.shutdown(wait=True)
        self.engine.dispose()


def new_id(prefix: str) -> str:
    """An object id in OpenAI's style: `file-…`, `batch_…`, `batch_req_…`."""
    return prefix + uuid.uuid4().hex
