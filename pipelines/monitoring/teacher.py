"""The data flywheel: doubtful traffic labelled by a teacher, verified by execution, versioned.

`label(...)` takes a window of the inference log and:

1. picks the doubtful requests (pipelines/monitoring/doubtful.py: each with its reasons; a
   person's label wins; poisoned rows never reach a teacher), at most `teacher.max_labels`;
2. asks the teacher (pipelines/monitoring/teachers.py: an OpenAI-compatible API, or locally the
   served champion on vLLM with more samples and the grammar) for k answers per question, with
   the one prompt (`build_prompt` over the schema the gateway fits for that question). Answers
   are cached as they arrive: a rerun pays for nothing twice, and a question whose request
   failed (or that the budget stopped) waits for the next run (`deferred`);
3. verifies before trusting: every answer goes through `pipelines.sql.verify` (parses, one
   read-only statement, real tables and columns, reads the data, executes within the bounds);
   the label is the SQL whose result set most answers share, kept only when that share
   reaches `min_agreement` (`empty_agreement` for an empty result), when the record passes
   `validate`'s contract (as feedback does) and, with an endpoint and `teacher.judge`, when
   the judge accepts it. Everything else goes to the quarantine with its rules and why;
4. appends the accepted labels to `<paths.teacher>/teacher.jsonl` (canonical records with
   `provenance`: teacher, prompt hash, agreement, reasons picked) + `databases/`, dropping
   any label a person has corrected since, and writes the report (`paths.teacher_report`):
   counts, cost, the quarantine, and where the next run resumes in the log.

Run: `sqlops label` or `python -m pipelines.monitoring.teacher`; the monitoring flow runs it
before it retrains.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.config import Params, TeacherConfig, ValidateConfig, load_params, setup_entry_point
from pipelines.data import validate
from pipelines.data.atomic import aside
from pipelines.data.records import FIELDS, detect_lang, question_key, read_jsonl
from pipelines.data.schema_fit import fit_schema
from pipelines.data.sources import difficulty_of
from pipelines.db_schema import ddl_of, schema_of
from pipelines.eval.judge import JudgeItem, client_from_env, judge
from pipelines.model.decoding import result_key
from pipelines.monitoring import doubtful, feedback
from pipelines.monitoring.teachers import Question, SampleCache, ask_all, teacher_from_params
from pipelines.sql import extract_sql, verify

log = logging.getLogger(__name__)
SOURCE_FILE = "teacher.jsonl"


@dataclass
class Verdict:
    """What the answers to one question support."""

    sql: str | None = None  # the label (the largest group's best-scoring answer)
    agreement: float = 0.0  # share of the answers whose result equals the label's
    n_rows: int | None = None  # rows the label returns
    rules: list[str] = field(default_factory=list)  # why not trusted (empty: trusted)
    why: dict[str, str] = field(default_factory=dict)
    answers: dict[str, int] = field(default_factory=dict)  # outcome of each answer → count


def vote(answers: list, db_path: Path, cfg: TeacherConfig, timeout_s: float, k: int = 0) -> Verdict:
    """Verify each answer (`pipelines.sql.verify`) and choose the label: the SQL whose result
    set most verified answers share (ties: the best log-probability, then the first). The
    agreement is over `k` answers when fewer came back (an endpoint that ignores `n`)."""
    schema = schema_of(db_path)
    checked: dict[str, Any] = {}
    groups: dict[tuple, list[tuple[float, int, str]]] = {}
    outcomes: Counter[str] = Counter()
    for i, (text, logprob) in enumerate(answers):
        sql = extract_sql(text or "")
        if sql not in checked:
            checked[sql] = verify(sql, db_path, schema, timeout_s)
        v = checked[sql]
        outcomes[v.failure or "ok"] += 1
        if v.ok:
            score = logprob if logprob is not None else float("-inf")
            groups.setdefault(result_key(v.rows), []).append((score, -i, sql))
    verdict = Verdict(answers=dict(outcomes))
    if not groups:
        rule = max((o for o in outcomes if o != "ok"), key=lambda o: outcomes[o])
        first = next(v for v in checked.values() if v.failure == rule)
        return Verdict(rules=[rule], why={rule: first.why.get(rule, "")}, answers=dict(outcomes))
    top = max(groups.values(), key=lambda g: (len(g), max(g)))
    verdict.sql = max(top)[2]
    verdict.agreement = len(top) / max(len(answers), k)
    verdict.n_rows = len(checked[verdict.sql].rows or [])
    share = f"{len(top)} of {max(len(answers), k)} answers return the label's result"
    if verdict.agreement < cfg.min_agreement:
        verdict.rules, verdict.why = ["agreement"], {"agreement": share}
    elif verdict.n_rows == 0 and verdict.agreement < cfg.empty_agreement:
        verdict.rules, verdict.why = ["empty_result"], {"empty_result": f"empty; {share}"}
    return verdict


@dataclass
class Labelling:
    teacher: str = ""
    kind: str = ""
    since: float | None = None  # the log window labelled: since <= ts < until
    until: float = 0.0
    next_since: float = 0.0  # where the next run starts (a deferred request, else `until`)
    doubtful: int = 0
    picked: int = 0
    cached: int = 0  # questions answered from the cache (no call)
    accepted: int = 0
    quarantined: int = 0
    deferred: int = 0  # no answer this run (endpoint down, budget): asked again next run
    overridden: int = 0  # earlier teacher labels dropped: a person corrected the question
    calls: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)  # why requests were doubtful
    skipped: dict[str, int] = field(default_factory=dict)  # doubtful but never asked, why
    rejected: dict[str, int] = field(default_factory=dict)  # quarantine rule → count
    labels: list[dict] = field(default_factory=list)  # the records accepted in this run
    quarantine: list[dict] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # deferred request id → why
    path: str | None = None


def _record(q: Question, v: Verdict, teacher: Any, domains: dict[str, str], now: float) -> dict:
    p = q.pick
    return {
        "id": f"teacher-{p.request_id}",
        "db_id": p.db_id,
        "domain": domains.get(p.db_id, p.db_id),
        "lang": p.lang or detect_lang(p.question),
        "question": p.question,
        "sql": v.sql,
        "ddl": q.ddl,
        "difficulty": difficulty_of(v.sql or ""),
        "source": "teacher",
        "split": "train",  # a hint only: `prepare` assigns the split
        "provenance": {
            "teacher": teacher.name,
            "teacher_kind": teacher.kind,
            "prompt_sha256": hashlib.sha256(q.prompt.encode()).hexdigest(),
            "answers": teacher.k,
            "agreement": round(v.agreement, 3),
            "picked_for": p.reasons,
            "request_id": p.request_id,
            "request_ts": p.ts,
            "labelled_at": now,
        },
    }


def _quarantine(q: Question, sql: str | None, rules: list[str], why: dict, extra: dict) -> dict:
    p = q.pick
    return {"request_id": p.request_id, "db_id": p.db_id, "question": p.question[:500],
            "sql": sql, "rules": rules, "why": why, "picked_for": p.reasons, **extra}  # fmt: skip


def label(
    window: pd.DataFrame,
    *,
    teacher: Any,
    databases: Path,
    out_dir: Path,
    cfg: TeacherConfig,
    rules: ValidateConfig,
    vocab: set[str],
    human: set[tuple[str, str]],
    cache_path: Path,
    sample_values: int,
    max_ddl_chars: int,
    domains: dict[str, str] | None = None,
    judge_cfg: Any = None,
    judge_cache: Path | None = None,
    until: float | None = None,
    since: float | None = None,
) -> Labelling:
    """Label the doubtful requests of `window` (see the module doc); `human`: (db_id,
    question_key) of every question a person labelled (their label wins); `judge_cfg`: the
    judge's block when it is to accept each label (an endpoint must be set)."""
    start = time.monotonic()
    until = time.time() if until is None else until
    domains = domains or {}
    out = Labelling(teacher=teacher.name, kind=teacher.kind, since=since, until=until)
    existing = read_jsonl(out_dir / SOURCE_FILE) if (out_dir / SOURCE_FILE).is_file() else []
    kept = [r for r in existing if (r["db_id"], question_key(r["question"])) not in human]
    out.overridden = len(existing) - len(kept)
    have = {(r["db_id"], question_key(r["question"])) for r in kept}
    known = {p.stem for p in databases.glob("*.sqlite")}
    picking = doubtful.pick(
        window, databases=known, labelled=human | have, vocab=vocab, cfg=cfg, limits=rules
    )
    out.doubtful, out.picked = picking.doubtful, len(picking.picks)
    out.reasons, out.skipped = picking.reasons, picking.skipped
    questions, ddl_cache = [], {}
    for pk in picking.picks:
        db = databases / f"{pk.db_id}.sqlite"
        if pk.db_id not in ddl_cache:
            ddl_cache[pk.db_id] = ddl_of(db, sample_values)
        prompt = teacher.prompt(
            fit_schema(ddl_cache[pk.db_id], pk.question, max_ddl_chars), pk.question
        )
        questions.append(Question(pk, ddl_cache[pk.db_id], prompt, teacher.requests(prompt, db)))
    cache = SampleCache(cache_path)
    try:
        answers, out.cached, out.errors = asyncio.run(ask_all(teacher, questions, cache))
    finally:
        cache.close()
    candidates = []
    for q in questions:
        got = answers.get(q.pick.request_id)
        if got is None:
            continue
        v = vote(got, databases / f"{q.pick.db_id}.sqlite", cfg, rules.sql_timeout_s, teacher.k)
        if v.rules:
            extra = {"agreement": round(v.agreement, 3), "answers": v.answers}
            out.quarantine.append(_quarantine(q, v.sql, v.rules, v.why, extra))
        else:
            candidates.append((q, _record(q, v, teacher, domains, until)))
    accepted = _contract(candidates, databases, rules, out)
    accepted = _judged(accepted, judge_cfg, judge_cache, teacher, cfg, out)
    out.labels = [r for _, r in accepted]
    out.accepted, out.quarantined = len(out.labels), len(out.quarantine)
    out.deferred = len(out.errors)
    out.rejected = dict(Counter(rule for q in out.quarantine for rule in q["rules"]))
    waiting = [q.pick.ts for q in questions if q.pick.request_id in out.errors]
    waiting += [picking.resume_at] if picking.resume_at is not None else []
    out.next_since = min(waiting) if waiting else until
    out.calls, out.cost_usd = out.calls + teacher.n_calls, round(out.cost_usd + teacher.cost_usd, 6)
    records = kept + out.labels
    feedback.write_source(out_dir, databases, records, sorted({r["db_id"] for r in records}),
                          SOURCE_FILE, (*FIELDS, "provenance"))  # fmt: skip
    out.path, out.seconds = str(out_dir / SOURCE_FILE), round(time.monotonic() - start, 2)
    log.info(
        "teacher %s: %d doubtful, %d picked, %d accepted, %d quarantined %s, %d deferred, $%.4f",
        teacher.name, out.doubtful, out.picked, out.accepted, out.quarantined,
        out.rejected or "", out.deferred, out.cost_usd,
    )  # fmt: skip
    return out


def _contract(candidates: list, databases: Path, rules: ValidateConfig, out: Labelling) -> list:
    """The candidates whose record passes `validate`'s contract; the rest quarantined."""
    if not candidates:
        return []
    records = [{k: r[k] for k in FIELDS} for _, r in candidates]
    df = validate.check_records(records, databases, rules.sql_timeout_s)
    kept = []
    for i, ((q, rec), failed) in enumerate(
        zip(candidates, validate.failing_rules(df, rules), strict=True)
    ):
        if failed:
            why = {c: df.iloc[i][f"{c}_why"] for c in failed if f"{c}_why" in df.columns}
            extra = {"agreement": rec["provenance"]["agreement"]}
            out.quarantine.append(
                _quarantine(q, rec["sql"], failed, {k: v for k, v in why.items() if v}, extra)
            )
        else:
            kept.append((q, rec))
    return kept


def _judged(
    accepted: list,
    judge_cfg: Any,
    judge_cache: Path | None,
    teacher: Any,
    cfg: TeacherConfig,
    out: Labelling,
) -> list:
    """With a judge configured, the labels it accepts; a label without a verdict waits."""
    if judge_cfg is None or not accepted:
        return accepted
    items = [JudgeItem(rec["id"], q.ddl, rec["question"], "", rec["sql"]) for q, rec in accepted]
    budget = max(0.0, cfg.max_cost_usd - teacher.cost_usd)
    report = judge(items, judge_cfg, judge_cache, max_cost_usd=budget)
    out.calls += report.calls
    out.cost_usd += report.cost_usd
    kept = []
    for q, rec in accepted:
        verdict = report.verdicts.get(rec["id"])
        if verdict is True:
            rec["provenance"]["judge"] = judge_cfg.model
            kept.append((q, rec))
        elif verdict is False:
            out.quarantine.append(
                _quarantine(
                    q,
                    rec["sql"],
                    ["judge"],
                    {"judge": f"{judge_cfg.model} answered no"},
                    {"agreement": rec["provenance"]["agreement"]},
                )
            )
        elif report.status != "skipped":
            out.errors[q.pick.request_id] = f"judge: {report.errors.get(rec['id'], 'no verdict')}"
        else:
            kept.append((q, rec))
    return kept


def read_report(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_report(path: Path, out: Labelling) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = asdict(out)
    body["labels"] = [r["id"] for r in out.labels]  # the records live in the data source
    tmp = aside(path)
    tmp.write_text(json.dumps(body, indent=2, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


def label_logged(
    p: Params,
    teacher: Any = None,
    until: float | None = None,
    since: float | None = None,
    human_since: float | None = None,
) -> Labelling:
    """`label` over the inference log since `since` (default: where the last run stopped,
    `paths.teacher_report`'s `next_since`) into `paths.teacher`; the report written (the
    monitoring flow, `sqlops label`). `human_since`: count people's labels from then on only
    (the demo's teacher arm, on questions an earlier arm corrected)."""
    from pipelines.serving.inference_log import InferenceLog

    teacher = teacher or teacher_from_params(p)
    prepared = p.path("prepared")
    last = read_report(p.path("teacher_report"))
    if since is None and last:
        since = last["next_since"]
    until = time.time() if until is None else until
    ilog = InferenceLog(p.serving.inference_log_url)
    judged = p.teacher.judge and client_from_env(p.evaluate.judge.timeout_s) is not None
    out = label(
        ilog.window(since=since, until=until),
        teacher=teacher,
        databases=prepared / "databases",
        out_dir=p.path("teacher"),
        cfg=p.teacher,
        rules=p.validate_.model_copy(update={"sql_timeout_s": p.monitoring.feedback_sql_timeout_s}),
        vocab=doubtful.training_vocab(prepared / "train.jsonl"),
        human=doubtful.human_keys(ilog.window(since=human_since)),
        cache_path=p.path("teacher_cache"),
        sample_values=p.data.sample_values,
        max_ddl_chars=p.serving.max_ddl_chars,
        domains=feedback.prepared_domains(prepared),
        judge_cfg=p.evaluate.judge if judged else None,
        judge_cache=p.path("judge_cache"),
        until=until,
        since=since,
    )
    write_report(p.path("teacher_report"), out)
    return out


def summary_line(out: Labelling | dict) -> str:
    o = asdict(out) if isinstance(out, Labelling) else out
    return (
        f"teacher {o['teacher']} ({o['kind']}): {o['doubtful']} doubtful requests, "
        f"{o['picked']} picked, {o['accepted']} accepted, {o['quarantined']} quarantined "
        f"{o['rejected'] or ''}, {o['deferred']} deferred; "
        f"${o['cost_usd']:.4f} in {o['calls']} calls"
    )


def main() -> None:
    setup_entry_point()
    out = label_logged(load_params())
    print(summary_line(out))


if __name__ == "__main__":
    main()
