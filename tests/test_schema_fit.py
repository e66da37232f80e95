"""The schema filter on a 47-table database (every synthetic domain's tables in one DDL)."""

from __future__ import annotations

import pytest
from sqlglot import exp

from pipelines.config import load_params
from pipelines.data import synth
from pipelines.data.records import read_jsonl
from pipelines.data.schema_fit import fit_schema, split_ddl
from pipelines.db_schema import ddl_of
from pipelines.sql import parse


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory):
    """(one DDL with every domain's tables, English examples of every domain)."""
    out = tmp_path_factory.mktemp("synth")
    cfg = load_params().synth.model_copy(update={"examples_per_domain": 40, "langs": ["en"]})
    synth.run(cfg, seed=5, out_dir=out)
    values = load_params().data.sample_values  # the DDL as prompts carry it
    ddls = [ddl_of(out / "databases" / f"{d}.sqlite", values) for d in cfg.domains]
    return "\n".join(ddls), read_jsonl(out / "examples.jsonl")


def gold_tables(sql: str) -> set[str]:
    return {t.name.lower() for t in parse(sql).find_all(exp.Table)}


def test_a_ddl_that_fits_is_left_as_it_is():
    ddl = "CREATE TABLE a (id INTEGER PRIMARY KEY);\nCREATE TABLE b (id INTEGER PRIMARY KEY);"
    assert fit_schema(ddl, "anything", 10_000) == ddl


def test_keeps_the_gold_tables_of_english_questions_within_a_quarter_of_the_schema(warehouse):
    ddl, examples = warehouse
    assert len(split_ddl(ddl)) >= 30
    budget = len(ddl) // 4
    kept = [gold_tables(e["sql"]) <= {t.name for t in split_ddl(fit_schema(ddl, e["question"],
            budget))} for e in examples]  # fmt: skip
    assert sum(kept) / len(kept) >= 0.99
    assert all(len(fit_schema(ddl, e["question"], budget)) <= budget for e in examples[:50])


def test_join_paths_stay_whole():
    ddl = "\n".join(
        [
            "CREATE TABLE students (student_id INTEGER PRIMARY KEY, full_name TEXT);",
            "CREATE TABLE courses (course_id INTEGER PRIMARY KEY, title TEXT);",
            "CREATE TABLE enrollments (enrollment_id INTEGER PRIMARY KEY, student_id INTEGER, "
            "course_id INTEGER, FOREIGN KEY (student_id) REFERENCES students (student_id), "
            "FOREIGN KEY (course_id) REFERENCES courses (course_id));",
            *[f"CREATE TABLE filler{i} (x{i} INTEGER, y{i} TEXT, z{i} REAL);" for i in range(30)],
        ]
    )
    fitted = fit_schema(ddl, "Which students take the course titled 'Algebra'?", 400)
    names = [t.name for t in split_ddl(fitted)]
    # The link table comes along although the question never names it.
    assert {"students", "courses", "enrollments"} <= set(names)
    assert names[:3] == ["students", "courses", "enrollments"]  # the DDL's order
