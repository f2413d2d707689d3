"""SQLite job store: the embedded default, one file on disk.

Safe across processes on one host (the Ingress, Denoiser and VAE replicas all open it): WAL journal
so readers never block the writer, `BEGIN IMMEDIATE` for every read-modify-write so two writers
serialize instead of losing an update, and a busy timeout instead of "database is locked" errors.
Several hosts need the Redis store (SQLite over a network filesystem is not safe).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from turbo_serve.jobs.record import ACTIVE_STATES, JobRecord, JobState, QueueFull
from turbo_serve.jobs.store import JobStore, Order

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    lease_expires_at REAL,
    finished_at REAL,
    idempotency_key TEXT UNIQUE,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
CREATE INDEX IF NOT EXISTS jobs_lease ON jobs (lease_expires_at) WHERE lease_expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
"""
_ACTIVE = tuple(s.value for s in ACTIVE_STATES)


class SqliteJobStore(JobStore):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()  # one connection per thread (sqlite3 objects are not shareable)
        self._connection().executescript(_SCHEMA)

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @staticmethod
    def _row_values(record: JobRecord) -> tuple:
        return (
            record.state.value,
            record.lease_expires_at if record.state.running else None,
            record.finished_at,
            json.dumps(record.to_dict()),
        )

    def _insert(self, record: JobRecord, max_active: int | None) -> tuple[JobRecord, bool]:
        with self._transaction() as db:
            if record.idempotency_key is not None:
                row = db.execute("SELECT data FROM jobs WHERE idempotency_key = ?", (record.idempotency_key,)).fetchone()
                if row is not None:
                    return JobRecord.from_dict(json.loads(row[0])), False
            if max_active is not None:
                marks = ",".join("?" * len(_ACTIVE))
                (active,) = db.execute(f"SELECT COUNT(*) FROM jobs WHERE state IN ({marks})", _ACTIVE).fetchone()
                if active >= max_active:
                    raise QueueFull(f"{active} unfinished jobs (limit {max_active})")
            state, lease, finished, data = self._row_values(record)
            db.execute(
                "INSERT INTO jobs (id, state, lease_expires_at, finished_at, idempotency_key, data) VALUES (?,?,?,?,?,?)",
                (record.id, state, lease, finished, record.idempotency_key, data),
            )
        return record, True

    def get(self, job_id: str) -> JobRecord | None:
        row = self._connection().execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else JobRecord.from_dict(json.loads(row[0]))

    def _update(self, job_id: str, change: Callable[[JobRecord], JobRecord]) -> JobRecord:
        with self._transaction() as db:
            row = db.execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            new = change(JobRecord.from_dict(json.loads(row[0])))
            db.execute(
                "UPDATE jobs SET state = ?, lease_expires_at = ?, finished_at = ?, data = ? WHERE id = ?",
                (*self._row_values(new), job_id),
            )
        return new

    def _ids(self, query: str, params: tuple) -> list[str]:
        return [row[0] for row in self._connection().execute(query, params)]

    def _queued_ids(self, limit: int) -> list[str]:
        return self._ids("SELECT id FROM jobs WHERE state = ? ORDER BY seq LIMIT ?", (JobState.QUEUED.value, limit))

    def _expired_lease_ids(self, now: float) -> list[str]:
        return self._ids("SELECT id FROM jobs WHERE lease_expires_at < ? ORDER BY seq", (now,))

    def _finished_before(self, when: float) -> list[str]:
        return self._ids("SELECT id FROM jobs WHERE finished_at < ? ORDER BY seq", (when,))

    def _delete(self, job_id: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def list(self, *, after: str | None = None, limit: int = 20, order: Order = "desc") -> tuple[list[JobRecord], bool]:
        db = self._connection()
        direction, compare = ("DESC", "<") if order == "desc" else ("ASC", ">")
        where, params = "", ()
        if after is not None:
            row = db.execute("SELECT seq FROM jobs WHERE id = ?", (after,)).fetchone()
            if row is None:
                raise KeyError(after)
            where, params = f"WHERE seq {compare} ?", (row[0],)
        rows = db.execute(f"SELECT data FROM jobs {where} ORDER BY seq {direction} LIMIT ?", (*params, limit + 1)).fetchall()
        records = [JobRecord.from_dict(json.loads(r[0])) for r in rows[:limit]]
        return records, len(rows) > limit

    def counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in JobState}
        for state, n in self._connection().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            counts[state] = n
        return counts

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
