"""Feedback → training data: verified corrections from the inference log as a data source.

A logged request becomes a labelled example when a user sent a corrected SQL
(`feedback_sql`) or confirmed the generated one (verdict `correct`). Each label is verified
before it is kept: one read-only statement (the guard), every table and column it names exists
in the request's database, and it executes within the time limit. The latest label per
(db_id, question) wins.

Writes `<paths.feedback>/feedback.jsonl` (canonical records, `source: feedback`) and a copy of
every database used under `databases/`, so the folder is a self-contained data source: add
`{type: feedback, path: <paths.feedback>}` to `data.sources` and `dvc repro` retrains on it. The
file is rebuilt from the whole log each time, so it is a function of the log (same log, same
bytes, same DVC hash).

Run: `python -m pipelines.monitoring.feedback`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import sqlglot

from pipelines.config import Params, load_params, setup_entry_point
from pipelines.data.records import detect_lang, write_jsonl
from pipelines.data.sources import difficulty_of
from pipelines.sql import UnsafeSQL, ddl_of, execute, guard, missing_refs, parse, schema_of

log = logging.getLogger(__name__)


@dataclass
class FeedbackExport:
    n_labelled: int = 0  # logged requests carrying a correction or a "correct" verdict
    n_verified: int = 0  # examples written
    rejected: dict[str, int] = field(default_factory=dict)  # reason → count
    path: Path | None = None  # feedback.jsonl


def labels(window: pd.DataFrame) -> pd.DataFrame:
    """Requests with a label: the corrected SQL, else the generated SQL a user confirmed.
    One row per (db_id, question), the latest feedback winning."""
    if window.empty:
        return window.assign(label=pd.Series(dtype=str))
    corrected = window["feedback_sql"].fillna("").str.strip()
    confirmed = (window["feedback_verdict"] == "correct") & window["sql"].notna()
    label = corrected.where(corrected != "", window["sql"].where(confirmed))
    out = window.assign(label=label).dropna(subset=["label"])
    out = out.sort_values(["feedback_ts", "ts"], na_position="first", kind="stable")
    return out.drop_duplicates(["db_id", "question"], keep="last").sort_values("ts", kind="stable")


def verify(sql: str, db: Path, timeout_s: float) -> str | None:
    """None when the SQL is a read-only query over real tables/columns that executes; else why
    not (a short reason, counted in the export's `rejected`)."""
    if not db.is_file():
        return "unknown database"
    try:
        guard(sql)
    except UnsafeSQL:
        return "not a single read-only query"
    try:
        if missing_refs(parse(sql), schema_of(db)):
            return "names missing tables or columns"
    except (sqlglot.errors.SqlglotError, ValueError):
        return "does not parse"
    result = execute(db, sql, timeout_s)
    if not result.ok:
        return "timeout" if result.error == "timeout" else "does not execute"
    return None


def export(
    window: pd.DataFrame,
    databases: Path,
    out_dir: Path,
    timeout_s: float,
    domains: dict[str, str] | None = None,
) -> FeedbackExport:
    """Verify the labels of logged requests against `databases/<db_id>.sqlite` and write the
    feedback source to `out_dir` (replacing it). `domains` maps db_id → domain (default: the
    db_id)."""
    domains = domains or {}
    rows = labels(window)
    result = FeedbackExport(n_labelled=len(rows))
    rejected: Counter[str] = Counter()
    records, used = [], {}
    for r in rows.itertuples(index=False):
        db = databases / f"{r.db_id}.sqlite"
        reason = verify(r.label, db, timeout_s)
        if reason:
            rejected[reason] += 1
            continue
        if r.db_id not in used:
            used[r.db_id] = ddl_of(db)
        sql = guard(r.label)
        records.append(
            {
                "id": f"feedback-{r.request_id}",
                "db_id": r.db_id,
                "domain": domains.get(r.db_id, r.db_id),
                "lang": r.lang or detect_lang(r.question),
                "question": r.question.strip(),
                "sql": sql,
                "ddl": used[r.db_id],
                "difficulty": difficulty_of(sql),
                "source": "feedback",
                "split": "train",  # a hint only: `prepare` assigns the split
            }
        )
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "databases").mkdir(parents=True)
    for db_id in sorted(used):
        shutil.copyfile(databases / f"{db_id}.sqlite", tmp / "databases" / f"{db_id}.sqlite")
    write_jsonl(tmp / "feedback.jsonl", records)
    # Swap in the new contents; the folder itself (and its git-tracked README) stays.
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir / "databases", ignore_errors=True)
    (tmp / "databases").rename(out_dir / "databases")
    (tmp / "feedback.jsonl").replace(out_dir / "feedback.jsonl")
    tmp.rmdir()
    result.n_verified, result.rejected = len(records), dict(rejected)
    result.path = out_dir / "feedback.jsonl"
    log.info(
        "feedback: %d labelled requests, %d verified examples, rejected %s",
        result.n_labelled,
        result.n_verified,
        result.rejected or "none",
    )
    return result


def export_logged(p: Params) -> FeedbackExport:
    """`export` of the whole inference log into `paths.feedback`, each record's domain read from
    the prepared data (the monitoring flow and `python -m pipelines.monitoring.feedback`)."""
    from pipelines.data.records import read_jsonl
    from pipelines.serving.inference_log import InferenceLog

    prepared = p.path("prepared")
    domains = {
        r["db_id"]: r["domain"]
        for split in ("train", "eval")
        if (prepared / f"{split}.jsonl").is_file()
        for r in read_jsonl(prepared / f"{split}.jsonl")
    }
    return export(
        InferenceLog(p.serving.inference_log_url).window(),
        prepared / "databases",
        p.path("feedback"),
        p.monitoring.feedback_sql_timeout_s,
        domains,
    )


def main() -> None:
    setup_entry_point()
    res = export_logged(load_params())
    print(json.dumps({**res.__dict__, "path": str(res.path)}, indent=2))


if __name__ == "__main__":
    main()
