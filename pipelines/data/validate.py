"""The `validate` stage: the prepared data's contract, checked with Great Expectations.

Every train/eval record becomes a row of a pandas DataFrame. Rules GX cannot express directly
(the gold SQL parses, is read-only, references real tables and columns, executes within the time
limit; no duplicates; no eval example leaked into train) are computed here as boolean columns,
which the suite then expects to be true. A check that cannot run because an earlier one failed
(no database, SQL that does not parse) is left empty, so each broken row fails only the rule that
names its actual problem.

Writes `summary.json` (per rule: success, unexpected count, up to 5 example rows) and GX Data Docs
under the report folder, then raises `DataValidationError` naming every failing rule, so that
`dvc repro` stops before training on bad data.

Run: `python -m pipelines.data.validate` (dvc stage `validate`).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urlparse
from urllib.request import url2pathname

import pandas as pd

from pipelines import sql as sqlmod
from pipelines.config import ValidateConfig, load_params, setup_entry_point
from pipelines.data.records import (
    DB_ID_PATTERN,
    DIFFICULTIES,
    FIELDS,
    question_key,
    read_jsonl,
    valid_db_id,
)
from pipelines.db_schema import schema_of
from pipelines.sql import normalize

if TYPE_CHECKING:
    from great_expectations.expectations import Expectation

log = logging.getLogger(__name__)

SPLITS = ("train", "eval", "selection", "real_schema")  # real_schema: held out like eval
N_EXAMPLES = 5  # example rows per failing rule in summary.json and the error message
# Computed checks (boolean columns, each with a `<name>_why` detail column) in the order they
# depend on each other, and what each demands.
# The SQL checks are `pipelines.sql.verify`'s, the ones the feedback export applies too.
CHECKS = {
    "db_exists": "the record's database exists",
    **sqlmod.CHECKS,
    "not_duplicate": "no other record of the same database asks the same question",
    "no_leakage": "no eval question or SQL also occurs in train",
}
# What a whole-table rule (no failing rows to show) reports instead.
_OBSERVED = ("observed_value", "partial_missing_list")


class DataValidationError(RuntimeError):
    """The prepared data broke the contract; the message names each failing rule."""

    def __init__(self, message: str, result: ValidationResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class RuleResult:
    rule: str
    description: str
    success: bool
    unexpected_count: int
    examples: list[dict] = field(default_factory=list)  # id, question, sql (+ value or why)
    observed: dict | None = None  # whole-table rules: what GX saw (e.g. missing values)


@dataclass
class ValidationResult:
    success: bool
    n_rows: int
    rules: list[RuleResult]
    summary_path: Path
    data_docs: Path | None  # index.html of the Data Docs site

    @property
    def failed(self) -> list[RuleResult]:
        return [r for r in self.rules if not r.success]


def _check_sql(
    sql: str, db: Path | None, schema: dict | None, timeout_s: float
) -> dict[str, object]:
    """The SQL checks of one record: {check: True/False/None (not checked), check_why: str}."""
    v = sqlmod.verify(sql, db, schema, timeout_s)
    return v.passed | {f"{check}_why": why for check, why in v.why.items()}


def check_records(records: list[dict], db_dir: Path, timeout_s: float) -> pd.DataFrame:
    """One row per record: the canonical fields (blank strings as missing) plus CHECKS columns
    (True / False / None when not applicable) and their `<check>_why` details."""
    df = pd.DataFrame.from_records(records, columns=list(FIELDS))
    # A blank required field is as missing as an absent one.
    df = df.apply(lambda c: c.map(lambda v: None if isinstance(v, str) and not v.strip() else v))
    df = df.astype(object).where(df.notna(), None)
    # A db_id that could name a file outside `db_dir` is never joined to it (rule db_id_safe).
    dbs = {d: db_dir / f"{d}.sqlite" for d in df["db_id"].dropna().unique() if valid_db_id(d)}
    schemas = {d: schema_of(db) if db.is_file() else None for d, db in dbs.items()}
    rows: list[dict[str, object]] = []
    sql_norm: list[str | None] = []  # for the leakage check
    for d, sql in zip(df["db_id"], df["sql"], strict=True):
        row: dict[str, object] = {}
        if d is not None and d in dbs:
            row["db_exists"] = schemas[d] is not None
            if not row["db_exists"]:
                row["db_exists_why"] = f"no {dbs[d].name} in {db_dir}"
        if sql is not None:
            row |= _check_sql(sql, dbs.get(d), schemas.get(d), timeout_s)
        rows.append(row)
        sql_norm.append(None if sql is None else normalize(sql))
    checks = pd.DataFrame.from_records(rows, index=df.index, columns=_check_columns())
    df = pd.concat([df, checks.astype(object).where(checks.notna(), None)], axis=1)
    _flag_duplicates_and_leakage(df, sql_norm)
    return df


def _check_columns() -> list[str]:
    return [c for check in CHECKS for c in (check, f"{check}_why")]


def _flag_duplicates_and_leakage(df: pd.DataFrame, sql_norm: list[str | None]) -> None:
    """Fill `not_duplicate` (all but the first of a db_id + normalised question) and
    `no_leakage` (held-out rows whose question or SQL also appears in train) in place."""
    first: dict[tuple[str, str], str] = {}
    is_train = df["split"] == "train"
    train_q = {question_key(q) for q in df.loc[is_train, "question"] if q is not None}
    train_sql = {n for n, t in zip(sql_norm, is_train, strict=True) if t and n is not None}
    for i, r in df.iterrows():
        if r["question"] is None:
            continue
        q = question_key(r["question"])
        key = (r["db_id"], q)
        df.at[i, "not_duplicate"] = key not in first
        if key in first:
            df.at[i, "not_duplicate_why"] = f"same question as {first[key]}"
        first.setdefault(key, r["id"])
        if r["split"] != "train" and sql_norm[i] is not None:
            leaked = "question" if q in train_q else "SQL" if sql_norm[i] in train_sql else ""
            df.at[i, "no_leakage"] = not leaked
            if leaked:
                df.at[i, "no_leakage_why"] = f"its {leaked} also occurs in train"


class Rule(NamedTuple):
    name: str
    description: str  # what the data must satisfy, in words (shown in reports and errors)
    expectation: Expectation


def rules(cfg: ValidateConfig) -> list[Rule]:
    """Every rule of the contract. The rule name travels in the expectation's `meta`, so GX
    results can be matched back to it."""
    import great_expectations.expectations as gxe

    lo, hi = cfg.min_question_chars, cfg.max_question_chars
    in_set, lengths = gxe.ExpectColumnValuesToBeInSet, gxe.ExpectColumnValueLengthsToBeBetween
    out = [
        Rule(
            f"{f}_present",
            f"`{f}` is present and not blank",
            gxe.ExpectColumnValuesToNotBeNull(column=f),
        )
        for f in FIELDS
    ] + [
        Rule("id_unique", "ids are unique", gxe.ExpectColumnValuesToBeUnique(column="id")),
        Rule(
            "db_id_safe",
            "db_id is 1-128 letters, digits, `_` or `-` (a file name)",
            gxe.ExpectColumnValuesToMatchRegex(column="db_id", regex=DB_ID_PATTERN),
        ),
        Rule(
            "question_length",
            f"questions have {lo}–{hi} characters",
            lengths(column="question", min_value=lo, max_value=hi),
        ),
        Rule(
            "lang_allowed",
            f"lang is one of {list(cfg.langs)}",
            in_set(column="lang", value_set=list(cfg.langs)),
        ),
        Rule(
            "difficulty_allowed",
            f"difficulty is one of {list(DIFFICULTIES)}",
            in_set(column="difficulty", value_set=list(DIFFICULTIES)),
        ),
        Rule(
            "split_allowed",
            f"split is one of {list(SPLITS)}",
            in_set(column="split", value_set=list(SPLITS)),
        ),
        Rule(
            "splits_not_empty",
            "both train and eval have examples",
            gxe.ExpectColumnDistinctValuesToContainSet(column="split", value_set=["train", "eval"]),
        ),
    ]
    out += [
        Rule(c, what.format(timeout=cfg.sql_timeout_s), in_set(column=c, value_set=[True]))
        for c, what in CHECKS.items()
    ]
    for rule in out:
        rule.expectation.meta = {"rule": rule.name}
        rule.expectation.description = rule.description
    return out


def _gx_validate(
    df: pd.DataFrame, suite_rules: list[Rule], gx_root: Path
) -> tuple[dict, Path | None]:
    """Run the rules on `df` in a file-mode GX project; returns {rule: GX result}, docs index."""
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="file", project_root_dir=str(gx_root))
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)  # no tqdm in DVC logs
    batch = (
        ctx.data_sources.add_pandas("prepared")
        .add_dataframe_asset("examples")
        .add_batch_definition_whole_dataframe("train_and_eval")
    )
    suite = ctx.suites.add(gx.ExpectationSuite(name="sqlops_examples"))
    for rule in suite_rules:
        suite.add_expectation(rule.expectation)
    definition = ctx.validation_definitions.add(
        gx.ValidationDefinition(name="prepared_examples", data=batch, suite=suite)
    )
    checkpoint = ctx.checkpoints.add(
        gx.Checkpoint(
            name="validate",
            validation_definitions=[definition],
            actions=[UpdateDataDocsAction(name="data_docs")],
            # SUMMARY + the index of the first few failing rows, enough for examples
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": N_EXAMPLES},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": df})
    by_rule = {
        r.expectation_config.meta["rule"]: r
        for run in result.run_results.values()
        for r in run.results
    }
    urls = ctx.get_docs_sites_urls(site_names=["local_site"])
    index = Path(url2pathname(urlparse(urls[0]["site_url"]).path)) if urls else None
    return by_rule, index


def failing_rules(df: pd.DataFrame, cfg: ValidateConfig) -> list[list[str]]:
    """The rules each row of a `check_records` frame breaks, run through GX from `rules(cfg)`
    like `run` does (whole-table rules, e.g. both splits having examples, are left out): the
    feedback export quarantines a record that breaks any."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    _quiet_gx()
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        ctx.data_sources.add_pandas("records")
        .add_dataframe_asset("rows")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": df})
    )
    suite = gx.ExpectationSuite(name="sqlops_rows")
    for rule in rules(cfg):
        suite.add_expectation(rule.expectation)
    run = batch.validate(suite, result_format={"result_format": "COMPLETE"})
    position = {label: i for i, label in enumerate(df.index)}
    failed: list[list[str]] = [[] for _ in range(len(df))]
    for res in run.results:
        for label in res.result.get("unexpected_index_list") or []:
            failed[position[label]].append(res.expectation_config.meta["rule"])
    return failed


def _quiet_gx() -> None:
    gx_log = logging.getLogger("great_expectations")
    if gx_log.level == logging.NOTSET:
        # Its INFO lines (hundreds, from import on) would drown the stage's own log.
        gx_log.setLevel(logging.WARNING)


def _examples(df: pd.DataFrame, column: str, res: dict) -> list[dict]:
    """The first failing rows of a rule: id, question, SQL, and why (a computed check) or the
    offending value (a field rule)."""
    out = []
    for i in res.get("partial_unexpected_index_list", [])[:N_EXAMPLES]:
        row = df.loc[i]
        ex = {"id": row["id"], "question": row["question"], "sql": row["sql"]}
        if column in CHECKS:
            ex["why"] = row[f"{column}_why"]
        elif column not in ex:
            ex["value"] = row[column]
        out.append(ex)
    return out


def _format_failures(failed: list[RuleResult], n_rows: int) -> str:
    lines = [f"data validation failed: {len(failed)} rule(s) broken over {n_rows} rows"]
    for r in failed:
        if r.observed is not None and not r.examples:
            lines.append(f"- {r.rule} ({r.description}): {r.observed}")
            continue
        lines.append(f"- {r.rule} ({r.description}): {r.unexpected_count} row(s), e.g.")
        for ex in r.examples:
            extra = ex.get("why") or (f"value={ex['value']!r}" if "value" in ex else "")
            lines.append(
                f"    id={ex['id']!r} question={ex['question']!r} sql={ex['sql']!r}"
                + (f"  [{extra}]" if extra else "")
            )
    return "\n".join(lines)


def run(cfg: ValidateConfig, prepared_dir: Path, report_dir: Path) -> ValidationResult:
    """Validate prepared train + eval; writes summary.json and Data Docs into `report_dir`,
    then raises `DataValidationError` if any rule fails."""
    if report_dir.exists():
        shutil.rmtree(report_dir)  # a DVC output; GX also refuses to re-add a suite by name
    report_dir.mkdir(parents=True)
    files = [prepared_dir / f"{s}.jsonl" for s in SPLITS]
    records = [r for f in files if f.is_file() for r in read_jsonl(f)]
    start = time.monotonic()
    df = check_records(records, prepared_dir / "databases", cfg.sql_timeout_s)
    log.info("computed checks for %d rows in %.1f s", len(df), time.monotonic() - start)
    _quiet_gx()
    suite_rules = rules(cfg)
    by_rule, docs = _gx_validate(df, suite_rules, report_dir)

    results = []
    for rule in suite_rules:
        gx_result = by_rule[rule.name]
        res, success = gx_result.result, bool(gx_result.success)
        results.append(
            RuleResult(
                rule=rule.name,
                description=rule.description,
                success=success,
                unexpected_count=int(res.get("unexpected_count") or 0),
                examples=[] if success else _examples(df, rule.expectation.column, res),
                observed={k: res[k] for k in _OBSERVED if res.get(k) is not None} or None,
            )
        )
    summary_path = report_dir / "summary.json"
    result = ValidationResult(
        success=all(r.success for r in results),
        n_rows=len(df),
        rules=results,
        summary_path=summary_path,
        data_docs=docs,
    )
    summary = {
        "success": result.success,
        "n_rows": result.n_rows,
        "n_by_split": {s: n for s in SPLITS if (n := int((df["split"] == s).sum()))},
        # relative, so that summary.json (a `train` dependency) is the same on every machine
        "data_docs": str(docs.relative_to(report_dir)) if docs else None,
        "rules": [asdict(r) for r in results],
    }
    summary_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False, default=str) + "\n")
    log.info("GX suite of %d rules run; Data Docs: %s", len(results), docs)
    if not result.success:
        raise DataValidationError(_format_failures(result.failed, result.n_rows), result)
    return result


def main() -> None:
    setup_entry_point()
    p = load_params()
    try:
        result = run(p.validate_, p.path("prepared"), p.path("validation"))
    except DataValidationError as e:
        log.error("%s", e)
        sys.exit(1)
    log.info("all %d rules hold over %d rows", len(result.rules), result.n_rows)


if __name__ == "__main__":
    main()
