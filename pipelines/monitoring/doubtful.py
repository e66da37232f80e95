"""Choosing what the teacher labels: the doubtful requests of the inference log, and why.

A request is doubtful when its served answer may well be wrong, for any of REASONS: the SQL
failed to execute or the guard refused it, it returned no rows, the decoding fell back (no
candidate executed) or its candidates had no majority, a user clicked "wrong" without giving
a correction, or the question is far from the training questions (its share of words no
training question has: the drift check's OOV signal, per question). Each pick keeps its
reasons: they travel with the label as provenance.

Requests a person labelled (a correction or a "correct" verdict: `feedback.labels`) are never
picked: a human label wins. Requests that could only poison the data are skipped before any
teacher sees them, each counted by why (SKIPS): refused by the gateway, a db_id that is not
a prepared database, a question outside `validate`'s length limits. Picks are deduplicated by
(db_id, `question_key`) among themselves and against what is already labelled, oldest first;
past `teacher.max_labels` the rest wait for the next run (`resume_at`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipelines.config import TeacherConfig, ValidateConfig
from pipelines.data.records import question_key, valid_db_id
from pipelines.monitoring import drift, feedback

REASONS = {
    "exec_error": "the served SQL failed to execute",
    "guard_rejected": "the guard refused the served SQL",
    "empty_result": "the served SQL returned no rows",
    "fallback": "no candidate executed: the best-scoring one was served",
    "candidates_disagree": "the candidates' results had no majority (decoding.n > 1)",
    "wrong_click": 'a user marked the answer "wrong" without a correction',
    "far_from_training": "most of the question's words occur in no training question",
}
SKIPS = {
    "request_refused": "the gateway refused the request (empty or oversized question, bad db_id)",
    "unknown_db": "the db_id names no prepared database",
    "question_length": "the question is outside validate's length limits",
    "labelled": "a person (or an earlier teacher run) has labelled this question",
    "duplicate": "the same question of the same database is picked already",
}


@dataclass
class Pick:
    request_id: str
    ts: float  # when the request arrived (unix seconds)
    db_id: str
    question: str
    lang: str
    served_sql: str | None  # what the gateway answered
    reasons: list[str]  # keys of REASONS


@dataclass
class Picking:
    picks: list[Pick] = field(default_factory=list)
    doubtful: int = 0  # requests with at least one reason
    reasons: dict[str, int] = field(default_factory=dict)  # reason → doubtful requests with it
    skipped: dict[str, int] = field(default_factory=dict)  # SKIPS key → doubtful requests
    resume_at: float | None = None  # arrival of the first pick left over (max_labels)


def training_vocab(train_path: Path) -> set[str]:
    """Every word of the training questions, tokenized as the drift check does."""
    questions = pd.read_json(train_path, lines=True, dtype=False)["question"]
    return {t for ts in drift.words(questions) for t in ts}


def human_keys(log: pd.DataFrame) -> set[tuple[str, str]]:
    """(db_id, question_key) of every question a person labelled anywhere in the log."""
    return {(r.db_id, question_key(r.question)) for r in feedback.labels(log).itertuples()}


def reasons_of(window: pd.DataFrame, vocab: set[str], cfg: TeacherConfig) -> list[list[str]]:
    """The REASONS that hold for each logged request, in REASONS order."""
    if window.empty:
        return []
    wrong = (window["feedback_verdict"] == "wrong") & window["feedback_sql"].fillna("").eq("")
    # Logs written before these columns existed have none (older gateways, tests' fixtures).
    fallback = window.get("fallback", pd.Series(None, index=window.index))
    agreement = window.get("agreement", pd.Series(None, index=window.index)).astype(float)
    flags = {
        "exec_error": window["status"] == "exec_error",
        "guard_rejected": window["status"] == "guard_rejected",
        "empty_result": window["executed"].astype(bool)
        & (window["status"] == "ok")
        & window["n_rows"].astype(float).fillna(0).eq(0),
        "fallback": fallback.eq(True),
        "candidates_disagree": agreement.le(0.5).fillna(False),
        "wrong_click": wrong,
        "far_from_training": pd.Series(
            drift.oov_rate(drift.words(window["question"].fillna("")), vocab) > cfg.pick_oov_rate,
            index=window.index,
        ),
    }
    table = pd.DataFrame(flags)
    return [[r for r in REASONS if row[r]] for _, row in table.iterrows()]


def _skip(row: object, databases: set[str], limits: ValidateConfig) -> str | None:
    if row.status == "bad_request":
        return "request_refused"
    if not valid_db_id(row.db_id) or row.db_id not in databases:
        return "unknown_db"
    if not limits.min_question_chars <= len(row.question.strip()) <= limits.max_question_chars:
        return "question_length"
    return None


def pick(
    window: pd.DataFrame,
    *,
    databases: set[str],
    labelled: set[tuple[str, str]],
    vocab: set[str],
    cfg: TeacherConfig,
    limits: ValidateConfig,
) -> Picking:
    """The doubtful requests of `window` (the inference log's rows) worth a teacher's label:
    on a db_id in `databases`, not among `labelled` (db_id, question_key) pairs, oldest first,
    at most `cfg.max_labels`."""
    out = Picking()
    reasons: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    taken = set(labelled)
    window = window.sort_values("ts", kind="stable")
    for row, why in zip(
        window.itertuples(index=False), reasons_of(window, vocab, cfg), strict=True
    ):
        if not why:
            continue
        out.doubtful += 1
        reasons.update(why)
        skip = _skip(row, databases, limits)
        key = (row.db_id, question_key(row.question))
        if skip is None and key in taken:
            skip = "labelled" if key in labelled else "duplicate"
        if skip is not None:
            skipped[skip] += 1
            continue
        taken.add(key)
        if len(out.picks) >= cfg.max_labels:
            out.resume_at = row.ts if out.resume_at is None else out.resume_at
            continue
        out.picks.append(
            Pick(row.request_id, row.ts, row.db_id, row.question.strip(), row.lang, row.sql, why)
        )
    out.reasons, out.skipped = dict(reasons), dict(skipped)
    return out
