"""Spider-format data as SQLite reads it: double-quoted strings, the Spider-Syn phrasings, the
per-source mix knobs (`max_examples`, `synonyms`, `max_ddl_chars`), on tiny folders built here
and on the repo's copy of Spider's training split."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from pipelines.config import ROOT, SourceConfig, load_params
from pipelines.data import prepare, sources
from pipelines.data.records import read_jsonl
from pipelines.db_schema import schema_of
from pipelines.sql import missing_refs, parse, single_quote_strings
from tests.conftest import make_db
from tests.test_prepare import _cfg, _synthetic

SCHEMA = {"village": ["name", "country"], "people": ["village", "age"]}


@pytest.mark.parametrize(
    ("sql", "canonical"),
    [
        # names no column: a string, written in single quotes (embedded quotes escaped)
        (
            'SELECT name FROM village WHERE country = "France" AND name LIKE "%a""b%"',
            "SELECT name FROM village WHERE country = 'France' AND name LIKE '%a\"b%'",
        ),
        (
            'SELECT "name" FROM village WHERE name = "O\'Neil"',
            "SELECT \"name\" FROM village WHERE name = 'O''Neil'",
        ),  # fmt: skip
        (
            'SELECT T1.name FROM village AS T1 WHERE T1.country IN ("a", "b")',
            "SELECT T1.name FROM village AS T1 WHERE T1.country IN ('a', 'b')",
        ),  # fmt: skip
        # a column of the query's tables, a select alias, a qualified name: identifiers
        ('SELECT * FROM people WHERE village = "Village"', None),
        ('SELECT count(*) AS n FROM village ORDER BY "n"', None),
        ('SELECT T1."country" FROM village AS T1', None),
        # a column of a table the query does not read is no column of the query's tables
        (
            'SELECT name FROM village WHERE name = "age"',
            "SELECT name FROM village WHERE name = 'age'",
        ),  # fmt: skip
        ('SELEC broken "x"', None),  # does not parse: left for the contract to name
    ],
)
def test_double_quoted_strings_are_read_as_sqlite_reads_them(sql: str, canonical: str | None):
    assert single_quote_strings(sql, SCHEMA) == (canonical or sql)


def test_rewritten_sql_returns_what_sqlite_returned(tmp_path: Path) -> None:
    db = make_db(
        tmp_path / "v.sqlite",
        "CREATE TABLE village (name TEXT, country TEXT);"
        "CREATE TABLE people (village TEXT, age INT);",
        [
            "INSERT INTO village VALUES ('Heilo', 'France')",
            "INSERT INTO people VALUES ('Heilo', 3)",
        ],
    )
    sql = 'SELECT name FROM village WHERE country = "France" OR name = "name"'
    new = single_quote_strings(sql, schema_of(db))
    assert new == "SELECT name FROM village WHERE country = 'France' OR name = \"name\""
    with sqlite3.connect(db) as conn:
        assert conn.execute(sql).fetchall() == conn.execute(new).fetchall() == [("Heilo",)]


def _spider(root: Path, rows: list[dict]) -> Path:
    make_db(
        root / "database" / "concert" / "concert.sqlite",
        "CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT, country TEXT);"
        "CREATE TABLE stadium (stadium_id INTEGER PRIMARY KEY, location TEXT);",
        ["INSERT INTO singer VALUES (1, 'A', 'France')", "INSERT INTO stadium VALUES (1, 'X')"],
    )
    (root / "train_spider.json").write_text(json.dumps(rows))
    return root


ROWS = [
    {
        "db_id": "concert",
        "question": "Which singers are from France?",
        "question_synonyms": "Which vocalists are from France?",
        "query": 'SELECT name FROM singer WHERE country = "France"',
    },
    {
        "db_id": "concert",
        "question": "Where are the stadiums?",
        "question_synonyms": "Where are the stadiums?",  # no synonym found: no second example
        "query": "SELECT location FROM stadium",
    },
]


def test_spider_source_canonical_sql_and_synonyms(tmp_path: Path) -> None:
    root = _spider(tmp_path / "spider", ROWS)
    plain = sources.load(SourceConfig(type="spider", path=root), tmp_path)
    assert [r["sql"] for r in plain.records] == [
        "SELECT name FROM singer WHERE country = 'France'",
        "SELECT location FROM stadium",
    ]
    both = sources.load(SourceConfig(type="spider", path=root, synonyms=True), tmp_path).records
    assert [(r["id"], r["source"], r["question"]) for r in both] == [
        ("spider-train_spider-00000", "spider", ROWS[0]["question"]),
        ("spider-train_spider-00000-syn", "spider-syn", ROWS[0]["question_synonyms"]),
        ("spider-train_spider-00001", "spider", ROWS[1]["question"]),
    ]
    assert both[0]["sql"] == both[1]["sql"]


def test_max_examples_and_schema_budget_per_source(tmp_path: Path) -> None:
    syn = _synthetic(tmp_path / "syn")
    root = _spider(tmp_path / "spider", ROWS)

    def train_of(out: str, **knobs) -> tuple[list[dict], dict]:
        src = SourceConfig(type="spider", path=root, **knobs)
        stats = prepare.run(_cfg(SourceConfig(type="synthetic"), src), 42, syn, tmp_path / out)
        rows = read_jsonl(tmp_path / out / "train.jsonl")
        return [r for r in rows if r["source"].startswith("spider")], stats

    # 0: none, and the source is not even read (a missing folder is no error then)
    gone = SourceConfig(type="spider", path=tmp_path / "nowhere", max_examples=0)
    prepare.run(_cfg(SourceConfig(type="synthetic"), gone), 42, syn, tmp_path / "none")
    assert not [
        r for r in read_jsonl(tmp_path / "none" / "train.jsonl") if r["source"] != "synthetic"
    ]
    assert len(train_of("all", synonyms=True)[0]) == 3
    assert len(train_of("two", synonyms=True, max_examples=2)[0]) == 2
    # A budget that cuts the table a question reads drops that training example (not the other).
    # 75 characters hold the stadium table alone: the singer question loses its table.
    kept, stats = train_of("tight", max_ddl_chars=75)
    assert stats["removed"]["schema_cut"] == 1
    assert [(r["question"], r["ddl"].split("(")[0]) for r in kept] == [
        (ROWS[1]["question"], "CREATE TABLE stadium ")
    ]


@pytest.mark.slow
def test_spider_training_split_meets_the_contract_unedited() -> None:
    """The repo's Spider copy: 1,490 of 6,901 gold queries write strings in double quotes, which
    the contract read as missing columns; imported, none is refused and each rewritten query
    returns what the original returned."""
    root = ROOT / load_params().paths.spider_train
    raw = json.loads((root / "train_spider.json").read_text())
    imported = sources.load(SourceConfig(type="spider", path=root), root).records
    assert len(raw) == len(imported) == 6901
    schemas = {
        d: schema_of(root / "database" / d / f"{d}.sqlite") for d in {r["db_id"] for r in raw}
    }

    def refused(sqls: list[str]) -> int:
        return sum(
            bool(missing_refs(parse(s), schemas[r["db_id"]]))
            for s, r in zip(sqls, raw, strict=True)
        )

    assert refused([r["query"] for r in raw]) == 1490
    assert refused([r["sql"] for r in imported]) == 0
    for r, new in zip(raw, imported, strict=True):
        if r["query"].rstrip(";").strip() != new["sql"]:
            db = root / "database" / r["db_id"] / f"{r['db_id']}.sqlite"
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                old_rows = sorted(map(repr, conn.execute(r["query"]).fetchall()))
                assert old_rows == sorted(map(repr, conn.execute(new["sql"]).fetchall())), r
