"""The inference log: one row per gateway request and its outcome, plus user feedback.

The gateway writes it, the monitoring flow reads time windows of it, and feedback corrections
become a data source for retraining. SQLite by default (`serving.inference_log_url`), any
SQLAlchemy URL in production. Relative sqlite paths resolve against the repo root.

A row that cannot be written (a locked or unreachable log) is kept in memory (up to
BACKLOG_ROWS) and written with the next row that can be: the gateway answers meanwhile, and
its request id stays valid. A log created before a column was added gets the column on open.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from typing import Any

import pandas as pd
import sqlalchemy as sa

from pipelines.config import sqlite_url
from pipelines.data.records import detect_lang

_meta = sa.MetaData()

requests = sa.Table(
    "requests",
    _meta,
    sa.Column("request_id", sa.String(32), primary_key=True),
    sa.Column("ts", sa.Float, nullable=False, index=True),  # unix seconds, request arrival
    sa.Column("db_id", sa.String(128), nullable=False),
    sa.Column("question", sa.Text, nullable=False),
    sa.Column("lang", sa.String(8)),  # "ko" when the question has Hangul, else "en"
    sa.Column("model_version", sa.String(128)),  # served adapter name, e.g. "text2sql-v3"
    sa.Column("sql", sa.Text),  # generated SQL (null when generation failed)
    # ok | guard_rejected | exec_error | backend_error | bad_request
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("executed", sa.Boolean, nullable=False, default=False),
    sa.Column("n_rows", sa.Integer),  # rows returned when executed
    sa.Column("error", sa.Text),  # reason for any status other than ok
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("cache_hit", sa.Boolean, nullable=False, default=False),
    sa.Column("feedback_verdict", sa.String(16)),  # "correct" | "wrong" from POST /v1/feedback
    sa.Column("feedback_sql", sa.Text),  # a user's corrected SQL
    sa.Column("feedback_ts", sa.Float),
    # A shadow answer (serving.shadow_share): the champion's and the challenger's, both executed,
    # for the gate; never shown to a user, left out of windows (drift, figures) by default.
    sa.Column("shadow", sa.Boolean, nullable=False, default=False, server_default=sa.false()),
    sa.Column("feedback_by", sa.String(32)),  # API-key id of who gave the feedback (not the key)
    # The decoding's doubts (n > 1): no candidate executed (the best-scoring one was answered),
    # and the share of candidates whose result equals the answer's. The teacher picks on both.
    sa.Column("fallback", sa.Boolean),
    sa.Column("agreement", sa.Float),
)

COLUMNS = [c.name for c in requests.columns]
BACKLOG_ROWS = 10_000  # rows kept while the log cannot be written (then the oldest are dropped)


def new_request_id() -> str:
    return uuid.uuid4().hex


class InferenceLog:
    """Append-only request log with feedback; safe to share across threads."""

    def __init__(self, url: str, lock_timeout_s: float | None = None):
        """`lock_timeout_s`: how long a SQLite write waits on a lock (None: the driver's 5 s)."""
        url = sqlite_url(url)
        sqlite = url.startswith("sqlite")
        args = {"timeout": lock_timeout_s} if sqlite and lock_timeout_s is not None else {}
        self.engine = sa.create_engine(url, connect_args=args)
        if self.engine.dialect.name == "sqlite":
            # Concurrent gateway workers and a monitoring reader on one file.
            with self.engine.begin() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        _meta.create_all(self.engine)
        self._add_missing_columns()
        self._backlog: deque[dict] = deque(maxlen=BACKLOG_ROWS)
        self._lock = threading.Lock()

    def _add_missing_columns(self) -> None:
        """Logs written by an older sqlops get the columns added since (`shadow` false on
        their rows, so they stay in every window)."""
        have = {c["name"] for c in sa.inspect(self.engine).get_columns(requests.name)}
        with self.engine.begin() as conn:
            for col in requests.columns:
                if col.name not in have:
                    kind = col.type.compile(dialect=self.engine.dialect)
                    default = col.server_default
                    if default is not None:
                        text = default.arg.compile(dialect=self.engine.dialect)
                        kind += f" NOT NULL DEFAULT {text}"
                    add = f"ALTER TABLE {requests.name} ADD COLUMN {col.name} {kind}"
                    conn.exec_driver_sql(add)

    def record(self, **row: Any) -> str:
        """Insert one request; fills `request_id`, `ts`, `lang` when absent. Returns the id.
        When the log cannot be written the row waits in the backlog (and the error is raised);
        the next successful call writes it first."""
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown inference log columns: {sorted(unknown)}")
        row.setdefault("request_id", new_request_id())
        row.setdefault("ts", time.time())
        row.setdefault("lang", detect_lang(row.get("question", "")))
        defaults = {"executed": False, "cache_hit": False, "shadow": False}
        full = {**dict.fromkeys(COLUMNS), **defaults, **row}
        with self._lock:
            pending = [*self._backlog, full]
            try:
                with self.engine.begin() as conn:
                    conn.execute(requests.insert(), pending)
            except sa.exc.OperationalError:
                self._backlog.append(full)
                raise
            self._backlog.clear()
        return row["request_id"]

    @property
    def backlog(self) -> int:
        """Rows waiting to be written."""
        return len(self._backlog)

    def record_many(self, rows: list[dict]) -> None:
        """Bulk insert (backfills, tests, the demo's traffic)."""
        full = []
        for row in rows:
            unknown = set(row) - set(COLUMNS)
            if unknown:
                raise ValueError(f"unknown inference log columns: {sorted(unknown)}")
            # executemany binds the first row's keys for all rows: give every row every column.
            full.append(
                {
                    **dict.fromkeys(COLUMNS),
                    "request_id": new_request_id(),
                    "ts": time.time(),
                    "lang": detect_lang(row.get("question", "")),
                    "executed": False,
                    "cache_hit": False,
                    "shadow": False,
                    **row,
                }
            )
        with self.engine.begin() as conn:
            conn.execute(requests.insert(), full)

    def add_feedback(
        self,
        request_id: str,
        verdict: str | None = None,
        correct_sql: str | None = None,
        by: str | None = None,
    ) -> bool:
        """Attach a verdict and/or corrected SQL (from API-key id `by`) to a logged request;
        False when unknown."""
        values = {"feedback_ts": time.time(), "feedback_by": by}
        if verdict is not None:
            values["feedback_verdict"] = verdict
        if correct_sql is not None:
            values["feedback_sql"] = correct_sql
        with self.engine.begin() as conn:
            res = conn.execute(
                requests.update().where(requests.c.request_id == request_id).values(**values)
            )
        return res.rowcount > 0

    def get(self, request_id: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(requests).where(requests.c.request_id == request_id)
            ).first()
        return dict(row._mapping) if row else None

    def window(
        self, since: float | None = None, until: float | None = None, shadow: bool = False
    ) -> pd.DataFrame:
        """Requests with `since <= ts < until` (either bound optional), oldest first; users'
        requests, or with `shadow` the shadow answers only."""
        q = sa.select(requests).order_by(requests.c.ts).where(requests.c.shadow == shadow)
        if since is not None:
            q = q.where(requests.c.ts >= since)
        if until is not None:
            q = q.where(requests.c.ts < until)
        with self.engine.connect() as conn:
            return pd.read_sql(q, conn)
