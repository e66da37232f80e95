"""Feedback → training data: verified corrections from the inference log as a data source.

A logged request becomes a labelled example when a user sent a corrected SQL
(`feedback_sql`) or confirmed the generated one (verdict `correct`), unless the request itself
was refused (`bad_request`: an empty or oversized question, an unknown db_id). The latest label
per (db_id, question) wins. Each candidate record is checked by the `validate` stage's own
contract (`validate.check_records` + `validate.failing_rules`: the db_id rule, question length,
language, the SQL checks of `pipelines.sql.verify` - read-only, real tables and columns, reads
the database and returns more than constants, executes within the bounded executor's limits), so
a record that would stop the next `dvc repro` never gets into the source. What fails is
quarantined: listed with the rules it broke in `paths.feedback_quarantine`.

Writes `<paths.feedback>/feedback.jsonl` (canonical records, `source: feedback`) and a copy of
every database used under `databases/`, so the folder is a self-contained data source: add
`{type: feedback, path: <paths.feedback>}` to `data.sources` and `dvc repro` retrains on it. The
file is rebuilt from the whole log each time, so it is a function of the log (same log, same
bytes, same DVC hash). Every file is written aside and renamed into place, new databases before
the JSONL that names them, unused ones removed after it: `prepare` reading the folder meanwhile
finds a database for every record.

Run: `python -m pipelines.monitoring.feedback`.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipelines.config import Params, ValidateConfig, load_params, setup_entry_point
from pipelines.data import validate
from pipelines.data.atomic import aside, copy_file
from pipelines.data.records import FIELDS, detect_lang, valid_db_id, write_jsonl
from pipelines.data.sources import difficulty_of
from pipelines.db_schema import ddl_of
from pipelines.sql import guard

log = logging.getLogger(__name__)
REFUSED = "bad_request"  # a request the gateway refused: its feedback is no training example


@dataclass
class FeedbackExport:
    n_labelled: int = 0  # logged requests carrying a correction or a "correct" verdict
    n_verified: int = 0  # examples written
    rejected: dict[str, int] = field(default_factory=dict)  # broken rule → count
    path: Path | None = None  # feedback.jsonl
    quarantine: list[dict] = field(default_factory=list)  # refused labels and their rules


def labels(window: pd.DataFrame) -> pd.DataFrame:
    """Requests with a label: the corrected SQL, else the generated SQL a user confirmed.
    One row per (db_id, question), the latest feedback winning; refused requests have none."""
    if window.empty:
        return window.assign(label=pd.Series(dtype=str))
    corrected = window["feedback_sql"].fillna("").str.strip()
    confirmed = (window["feedback_verdict"] == "correct") & window["sql"].notna()
    label = corrected.where(corrected != "", window["sql"].where(confirmed))
    out = window.assign(label=label).dropna(subset=["label"])
    out = out.sort_values(["feedback_ts", "ts"], na_position="first", kind="stable")
    out = out.drop_duplicates(["db_id", "question"], keep="last").sort_values("ts", kind="stable")
    return out


def _candidate(r: object, domains: dict[str, str], ddl: dict[str, str]) -> dict:
    """The canonical record a label would become (its SQL guarded where it can be)."""
    try:
        sql = guard(r.label)
    except ValueError:
        sql = r.label.strip()
    return {
        "id": f"feedback-{r.request_id}",
        "db_id": r.db_id,
        "domain": domains.get(r.db_id, r.db_id),
        "lang": r.lang or detect_lang(r.question),
        "question": r.question.strip(),
        "sql": sql,
        "ddl": ddl.get(r.db_id, ""),
        "difficulty": difficulty_of(sql),
        "source": "feedback",
        "split": "train",  # a hint only: `prepare` assigns the split
    }


def _ddl(db: Path, sample_values: int) -> str:
    """The prompt DDL of a database; "" when it is missing or unreadable (db_exists or
    ddl_present then names the problem)."""
    try:
        return ddl_of(db, sample_values)
    except (FileNotFoundError, sqlite3.Error):
        return ""


def _refusal(db_id: str, status: str) -> str | None:
    if status == REFUSED:
        return "request_refused"
    if not valid_db_id(db_id):
        return "db_id_safe"
    return None


def export(
    window: pd.DataFrame,
    databases: Path,
    out_dir: Path,
    cfg: ValidateConfig,
    domains: dict[str, str] | None = None,
    quarantine_path: Path | None = None,
    *,
    sample_values: int,
) -> FeedbackExport:
    """Check the labels of logged requests against `databases/<db_id>.sqlite` with the
    validation contract `cfg` and write the feedback source to `out_dir` (replacing it); what
    fails goes to `quarantine_path` (JSON) with the rules it broke. `domains` maps db_id →
    domain (default: the db_id); each record's DDL lists `sample_values` as `prepare` does."""
    domains = domains or {}
    rows = labels(window)
    result = FeedbackExport(n_labelled=len(rows))
    candidates, refused, ddl = [], [], {}
    for r in rows.itertuples(index=False):
        reason = _refusal(r.db_id, r.status)
        if not reason and r.db_id not in ddl:
            ddl[r.db_id] = _ddl(databases / f"{r.db_id}.sqlite", sample_values)
        record = _candidate(r, domains, ddl)
        if reason:
            refused.append((record, [reason], {}))
        else:
            candidates.append(record)
    df = validate.check_records(candidates, databases, cfg.sql_timeout_s) if candidates else None
    broken = validate.failing_rules(df, cfg) if df is not None else []
    records = []
    for i, (record, failed) in enumerate(zip(candidates, broken, strict=True)):
        if failed:
            why = {c: df.iloc[i][f"{c}_why"] for c in failed if f"{c}_why" in df.columns}
            refused.append((record, failed, {k: v for k, v in why.items() if v}))
        else:
            records.append(record)
    write_source(out_dir, databases, records, sorted({r["db_id"] for r in records}))
    rejected: Counter[str] = Counter(rule for _, failed, _ in refused for rule in failed)
    result.quarantine = [
        {"request_id": rec["id"].removeprefix("feedback-"), "db_id": rec["db_id"],
         "question": rec["question"], "sql": rec["sql"], "rules": failed, "why": why}
        for rec, failed, why in refused
    ]  # fmt: skip
    result.n_verified, result.rejected = len(records), dict(rejected)
    result.path = out_dir / "feedback.jsonl"
    if quarantine_path is not None:
        _write_quarantine(quarantine_path, result)
    log.info(
        "feedback: %d labelled requests, %d verified examples, quarantined %s",
        result.n_labelled,
        result.n_verified,
        result.rejected or "none",
    )
    return result


def write_source(
    out_dir: Path,
    databases: Path,
    records: list[dict],
    db_ids: list[str],
    name: str = "feedback.jsonl",
    fields: tuple[str, ...] = FIELDS,
) -> None:
    """New databases first, then the JSONL `name` naming them (each record's `fields`), then
    unused databases go: every moment, each record of the current JSONL has its database. The
    folder itself (and its git-tracked README) stays. The teacher source is written so too."""
    db_out = out_dir / "databases"
    db_out.mkdir(parents=True, exist_ok=True)
    for db_id in db_ids:
        copy_file(databases / f"{db_id}.sqlite", db_out / f"{db_id}.sqlite")
    tmp = aside(out_dir / name)
    write_jsonl(tmp, ({k: r[k] for k in fields} for r in records))
    os.replace(tmp, out_dir / name)
    keep = {f"{d}.sqlite" for d in db_ids}
    for path in db_out.iterdir():
        if path.name not in keep:
            path.unlink()


def _write_quarantine(path: Path, result: FeedbackExport) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "n_labelled": result.n_labelled,
        "n_verified": result.n_verified,
        "rejected": result.rejected,
        "quarantined": result.quarantine,
    }
    tmp = aside(path)
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


def prepared_domains(prepared: Path) -> dict[str, str]:
    """db_id → domain, as the prepared data names them."""
    from pipelines.data.records import read_jsonl

    return {
        r["db_id"]: r["domain"]
        for split in ("train", "eval")
        if (prepared / f"{split}.jsonl").is_file()
        for r in read_jsonl(prepared / f"{split}.jsonl")
    }


def export_logged(p: Params) -> FeedbackExport:
    """`export` of the whole inference log into `paths.feedback`, each record's domain read from
    the prepared data (the monitoring flow and `python -m pipelines.monitoring.feedback`)."""
    from pipelines.serving.inference_log import InferenceLog

    prepared = p.path("prepared")
    domains = prepared_domains(prepared)
    rules = p.validate_.model_copy(update={"sql_timeout_s": p.monitoring.feedback_sql_timeout_s})
    return export(
        InferenceLog(p.serving.inference_log_url).window(),
        prepared / "databases",
        p.path("feedback"),
        rules,
        domains,
        p.path("feedback_quarantine"),
        sample_values=p.data.sample_values,
    )


def main() -> None:
    setup_entry_point()
    res = export_logged(load_params())
    summary = {k: v for k, v in res.__dict__.items() if k != "quarantine"}
    print(json.dumps({**summary, "path": str(res.path)}, indent=2))


if __name__ == "__main__":
    main()
