"""The inference log: one row per gateway request and its outcome, plus user feedback.

The gateway writes it, the monitoring flow reads time windows of it, and feedback corrections
become a data source for retraining. SQLite by default (`serving.inference_log_url`), any
SQLAlchemy URL in production. Relative sqlite paths resolve against the repo root.
"""

from __future__ import annotations

import time
import uuid
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
)

COLUMNS = [c.name for c in requests.columns]


def new_request_id() -> str:
    return uuid.uuid4().hex


class InferenceLog:
    """Append-only request log with feedback; safe to share across threads."""

    def __init__(self, url: str):
        self.engine = sa.create_engine(sqlite_url(url))
        if self.engine.dialect.name == "sqlite":
            # Concurrent gateway workers and a monitoring reader on one file.
            with self.engine.begin() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        _meta.create_all(self.engine)

    def record(self, **row: Any) -> str:
        """Insert one request; fills `request_id`, `ts`, `lang` when absent. Returns the id."""
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown inference log columns: {sorted(unknown)}")
        row.setdefault("request_id", new_request_id())
        row.setdefault("ts", time.time())
        row.setdefault("lang", detect_lang(row.get("question", "")))
        with self.engine.begin() as conn:
            conn.execute(requests.insert().values(**row))
        return row["request_id"]

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
                    **row,
                }
            )
        with self.engine.begin() as conn:
            conn.execute(requests.insert(), full)

    def add_feedback(
        self, request_id: str, verdict: str | None = None, correct_sql: str | None = None
    ) -> bool:
        """Attach a verdict and/or corrected SQL to a logged request; False when unknown."""
        values = {"feedback_ts": time.time()}
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

    def window(self, since: float | None = None, until: float | None = None) -> pd.DataFrame:
        """Requests with `since <= ts < until` (either bound optional), oldest first."""
        q = sa.select(requests).order_by(requests.c.ts)
        if since is not None:
            q = q.where(requests.c.ts >= since)
        if until is not None:
            q = q.where(requests.c.ts < until)
        with self.engine.connect() as conn:
            return pd.read_sql(q, conn)
