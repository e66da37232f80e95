"""The `prepare` stage on tiny sources built here: synthetic, seed-book JSONL/CSV, Spider."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import pytest

from pipelines.config import DataConfig, SourceConfig, load_params
from pipelines.data import prepare
from pipelines.data.records import FIELDS, detect_lang, question_key, read_jsonl, write_jsonl
from pipelines.data.sources import difficulty_of
from pipelines.db_schema import ddl_of, schema_of
from pipelines.sql import execute
from tests.conftest import GAME_DDL, GAME_QA, GAME_ROWS, SHOP_DDL, SHOP_QA, SHOP_ROWS, make_db


def _synthetic(root: Path, extra: list[dict] | None = None) -> Path:
    """A synth-stage output: examples.jsonl (no ddl field) + databases/<db_id>.sqlite."""
    make_db(root / "databases" / "shop.sqlite", SHOP_DDL, SHOP_ROWS)
    make_db(root / "databases" / "game.sqlite", GAME_DDL, GAME_ROWS)
    rows = [
        {
            "id": f"{db}-{i}",
            "db_id": db,
            "domain": db,
            "lang": lang,
            "question": q,
            "sql": sql,
            "difficulty": diff,
            "source": "synthetic",
        }
        for db, qa in (("shop", SHOP_QA), ("game", GAME_QA))
        for i, (q, sql, diff, lang) in enumerate(qa)
    ]
    write_jsonl(root / "examples.jsonl", rows + (extra or []))
    return root


def _cfg(*sources: SourceConfig, split: str = "held_out_domain", **kw) -> DataConfig:
    """params.yaml's data block over the fixture's sources (shop trains, game is held out)."""
    return load_params().data.model_copy(
        update={
            "sources": list(sources) or [SourceConfig(type="synthetic")],
            "split": split,
            "eval_domains": kw.get("eval_domains", ["game"]),
            "selection_domains": kw.get("selection_domains", []),
            "eval_fraction": kw.get("eval_fraction", 0.25),
            "real_schema": kw.get("real_schema", []),  # tests/test_real_schema.py has its own
        }
    )


def test_synthetic_held_out_domain(tmp_path: Path) -> None:
    syn = _synthetic(tmp_path / "syn")
    out = tmp_path / "prepared"
    (out / "databases").mkdir(parents=True)
    (out / "databases" / "stale.sqlite").write_text("left by an earlier run")

    stats = prepare.run(_cfg(), 42, syn, out)

    train, evals = read_jsonl(out / "train.jsonl"), read_jsonl(out / "eval.jsonl")
    assert {r["domain"] for r in train} == {"shop"} and {r["domain"] for r in evals} == {"game"}
    assert len(train) == len(SHOP_QA) and len(evals) == len(GAME_QA)
    assert all(tuple(r) == FIELDS for r in train + evals)
    assert sorted(p.name for p in (out / "databases").iterdir()) == ["game.sqlite", "shop.sqlite"]
    assert train[0]["ddl"] == ddl_of(syn / "databases" / "shop.sqlite", _cfg().sample_values)
    assert stats["n"] == {"train": 10, "eval": 10}
    assert stats["eval"]["lang"] == {"en": 6, "ko": 4}
    assert stats["train"]["difficulty"] == {"easy": 5, "extra": 1, "hard": 1, "medium": 3}
    assert stats["removed"] == {
        "duplicates_exact": 0,
        "duplicates_question": 0,
        "leakage": 0,
        "real_schema_databases": 0,
        "schema_cut": 0,
    }
    assert json.loads((out / "stats.json").read_text()) == stats


def test_selection_domain_is_held_out_of_training_in_its_own_file(tmp_path: Path) -> None:
    """`data.selection_domains` (choosing knobs) never trains and is not the reported eval set;
    a training question that repeats a selection question is dropped as leakage."""
    shop = {"db_id": "shop", "domain": "shop", "lang": "en", "difficulty": "easy"}
    leak = {**shop, "id": "leak", "source": "synthetic", "question": GAME_QA[0][0].upper()}
    leak["sql"] = "SELECT 3"
    cfg = _cfg(split="random", eval_fraction=0.25, selection_domains=["game"])
    stats = prepare.run(cfg, 42, _synthetic(tmp_path / "syn", [leak]), tmp_path / "o")
    out = {s: read_jsonl(tmp_path / "o" / f"{s}.jsonl") for s in ("train", "eval", "selection")}
    assert {r["domain"] for r in out["selection"]} == {"game"} and len(out["selection"]) == 10
    assert all(r["domain"] == "shop" for r in out["train"] + out["eval"]) and out["eval"]
    assert "leak" not in {r["id"] for r in out["train"]}
    assert stats["n"]["selection"] == 10


def test_duplicates_and_leakage_are_removed_and_counted(tmp_path: Path) -> None:
    base = {
        "domain": "shop",
        "db_id": "shop",
        "lang": "en",
        "difficulty": "easy",
        "source": "synthetic",
    }
    extra = [
        {**base, "id": "dup-exact", "question": SHOP_QA[0][0], "sql": SHOP_QA[0][1]},
        {**base, "id": "dup-norm", "question": "list EVERY customer   name", "sql": "SELECT 1"},
        # Same question as an eval (game) example, and same SQL modulo formatting as another.
        {**base, "id": "leak-q", "question": "How many players are there", "sql": "SELECT 2"},
        {
            **base,
            "id": "leak-sql",
            "question": "Count the players",
            "sql": "select  count(*) from PLAYERS;",
        },
    ]
    stats = prepare.run(_cfg(), 42, _synthetic(tmp_path / "syn", extra), tmp_path / "out")

    train_ids = {r["id"] for r in read_jsonl(tmp_path / "out" / "train.jsonl")}
    assert not train_ids & {"dup-exact", "dup-norm", "leak-q", "leak-sql"}
    assert "shop-0" in train_ids  # the first occurrence is the one kept
    removed = {"duplicates_exact": 1, "duplicates_question": 1, "leakage": 2}
    assert removed.items() <= stats["removed"].items()
    assert stats["n_imported"] == 24


def test_random_split_is_seeded(tmp_path: Path) -> None:
    syn = _synthetic(tmp_path / "syn")
    cfg = _cfg(split="random", eval_fraction=0.25)
    a = prepare.run(cfg, 7, syn, tmp_path / "a")
    b = prepare.run(cfg, 7, syn, tmp_path / "b")
    assert (tmp_path / "a" / "eval.jsonl").read_text() == (
        tmp_path / "b" / "eval.jsonl"
    ).read_text()
    assert a["n"]["eval"] == 5  # round(20 * 0.25)
    assert a["n"]["train"] + a["removed"]["leakage"] == 15
    assert set(a["eval"]["domain"]) | set(a["train"]["domain"]) == {"shop", "game"}
    assert b == a


def test_empty_eval_split_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty train or eval"):
        prepare.run(_cfg(eval_domains=["nope"]), 42, _synthetic(tmp_path / "syn"), tmp_path / "o")


def _book_rows() -> list[dict]:
    # The seed book's columns; MySQL-flavoured DDL; no lang/difficulty/domain.
    players = (
        "CREATE TABLE players (player_id INT PRIMARY KEY AUTO_INCREMENT, "
        "username VARCHAR(255) UNIQUE NOT NULL, level INT DEFAULT 1);"
    )
    items = "CREATE TABLE items (item_id INT PRIMARY KEY, name VARCHAR(100), price DECIMAL(10,2));"
    return [
        {
            "db_id": 1,
            "context": players,
            "question": "모든 플레이어 정보를 조회해 줘",
            "answer": "SELECT * FROM players;",
        },
        {
            "db_id": 1,
            "context": players,
            "question": "레벨별 플레이어 수를 알려줘",
            "answer": "SELECT level, COUNT(*) FROM players GROUP BY level;",
        },
        {
            "db_id": 2,
            "context": items,
            "question": "What is the most expensive item?",
            "answer": "SELECT name FROM items ORDER BY price DESC LIMIT 1;",
        },
        {
            "db_id": 2,
            "context": items,
            "question": "가격이 10 이상인 아이템 이름",
            "answer": "SELECT name FROM items WHERE price >= 10;",
        },
    ]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_seed_book_file_without_databases(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"book.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, _book_rows())
    else:
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["db_id", "context", "question", "answer"])
            w.writeheader()
            w.writerows(_book_rows())
    src = SourceConfig(type="jsonl", path=path, domains={"1": "game", "2": "shop"})
    stats = prepare.run(_cfg(src), 42, tmp_path / "unused", tmp_path / "out")

    evals = read_jsonl(tmp_path / "out" / "eval.jsonl")
    train = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert stats["n"] == {"train": 2, "eval": 2}
    assert [r["lang"] for r in evals] == ["ko", "ko"] and [r["lang"] for r in train] == ["en", "ko"]
    assert evals[0]["sql"] == "SELECT * FROM players"  # one canonical form: no trailing `;`
    assert evals[0]["ddl"].startswith("CREATE TABLE players")  # the source's own DDL is kept
    assert [r["difficulty"] for r in evals] == ["easy", "medium"]
    assert evals[0]["id"] == "book-000000" and evals[0]["db_id"] == "1"
    # No database shipped: an empty one was built from the DDL, so the SQL can be checked.
    db = tmp_path / "out" / "databases" / "1.sqlite"
    assert schema_of(db) == {"players": ["player_id", "username", "level"]}
    assert execute(db, evals[1]["sql"], timeout_s=1).ok


def test_jsonl_source_with_databases_and_mixed_sources(tmp_path: Path) -> None:
    dbs = tmp_path / "dbs"
    make_db(dbs / "school.sqlite", "CREATE TABLE students (id INTEGER, name TEXT);", [])
    path = tmp_path / "extra.jsonl"
    write_jsonl(
        path,
        [
            {
                "db_id": "school",
                "question": "List all student names",
                "sql": "SELECT name FROM students",
                "domain": "school",
                "id": "s-1",
            }
        ],
    )
    src = SourceConfig(type="jsonl", path=path, databases=dbs)
    prepare.run(
        _cfg(SourceConfig(type="synthetic"), src),
        42,
        _synthetic(tmp_path / "syn"),
        tmp_path / "out",
    )
    train = read_jsonl(tmp_path / "out" / "train.jsonl")
    school = [r for r in train if r["db_id"] == "school"]
    values = _cfg().sample_values
    assert school[0]["ddl"] == ddl_of(
        dbs / "school.sqlite", values
    )  # no DDL in the row: from the DB
    assert school[0]["source"] == "extra" and school[0]["difficulty"] == "easy"
    assert (tmp_path / "out" / "databases" / "school.sqlite").is_file()


def test_conflicting_db_ids_are_an_error(tmp_path: Path) -> None:
    dbs = tmp_path / "dbs"
    make_db(dbs / "shop.sqlite", "CREATE TABLE other (x INTEGER);", [])
    path = tmp_path / "extra.jsonl"
    write_jsonl(path, [{"db_id": "shop", "question": "Any x?", "sql": "SELECT x FROM other"}])
    src = SourceConfig(type="jsonl", path=path, databases=dbs)
    with pytest.raises(ValueError, match="two different databases"):
        prepare.run(
            _cfg(SourceConfig(type="synthetic"), src),
            42,
            _synthetic(tmp_path / "syn"),
            tmp_path / "out",
        )


def test_spider_directory(tmp_path: Path) -> None:
    root = tmp_path / "spider"
    make_db(
        root / "database" / "concert" / "concert.sqlite",
        "CREATE TABLE singer (singer_id INTEGER, name TEXT, age INTEGER);",
        ["INSERT INTO singer VALUES (1, 'A', 30)"],
    )
    (root / "tables.json").write_text("[]")
    spider_rows = [
        {
            "db_id": "concert",
            "question": "How many singers do we have?",
            "query": "SELECT count(*) FROM singer",
        },
        {
            "db_id": "concert",
            "question": "Names of singers older than 20?",
            "query": "SELECT name FROM singer WHERE age > 20",
        },
        {"db_id": "missing_db", "question": "Skipped?", "query": "SELECT 1"},
    ]
    (root / "dev.json").write_text(json.dumps(spider_rows))
    (root / "train_spider.json").write_text(json.dumps(spider_rows[1:2]))  # a duplicate
    src = SourceConfig(type="spider", path=root)
    cfg = _cfg(SourceConfig(type="synthetic"), src, eval_domains=["concert"])
    stats = prepare.run(cfg, 42, _synthetic(tmp_path / "syn"), tmp_path / "out")

    evals = read_jsonl(tmp_path / "out" / "eval.jsonl")
    assert [r["question"] for r in evals] == [
        spider_rows[1]["question"],
        spider_rows[0]["question"],
    ]
    assert {r["source"] for r in evals} == {"spider"} and evals[0]["lang"] == "en"
    assert evals[0]["ddl"] == ddl_of(
        root / "database" / "concert" / "concert.sqlite", cfg.sample_values
    )
    assert stats["removed"]["duplicates_exact"] == 1


@pytest.mark.slow
def test_spider_import_passes_the_data_contract(tmp_path: Path) -> None:
    from pipelines.data import validate
    from tests.test_validate import CFG

    test_spider_directory(tmp_path)  # writes the Spider folder and prepares it into out/
    result = validate.run(CFG, tmp_path / "out", tmp_path / "report")
    assert result.success and not result.failed
    assert json.loads(result.summary_path.read_text())["n_by_split"]["eval"] == 2


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT name FROM t", "easy"),
        ("SELECT a, COUNT(*) FROM t GROUP BY a", "medium"),
        ("SELECT a FROM t ORDER BY b DESC LIMIT 3", "medium"),
        ("SELECT a FROM t WHERE b IN (SELECT b FROM u)", "hard"),
        ("SELECT a FROM t INTERSECT SELECT a FROM u", "hard"),
        (
            "SELECT a, b FROM t JOIN u ON t.id = u.id WHERE x = 1 AND y LIKE 'z%' ORDER BY a",
            "extra",
        ),
        ("SELEC nonsense", "extra"),
    ],
)
def test_difficulty_of(sql: str, expected: str) -> None:
    assert difficulty_of(sql) == expected


def test_detect_lang_and_question_key() -> None:
    assert detect_lang("서울 고객 수 (count)") == "ko" and detect_lang("How many?") == "en"
    assert question_key("  How MANY   orders, in total? ") == "how many orders in total"
    assert question_key("주문은 몇 개야?") == "주문은 몇 개야"


def test_built_database_skips_bad_tables(tmp_path: Path) -> None:
    from pipelines.data.sources import build_db_from_ddl

    n = build_db_from_ddl(
        [
            "CREATE TABLE a (x INT); CREATE TABLE a (y INT);",
            "CREATE TABLE b (z INT) ENGINE=InnoDB;",
        ],
        tmp_path / "x.sqlite",
    )
    assert n == 2
    with sqlite3.connect(tmp_path / "x.sqlite") as conn:
        assert [r[1] for r in conn.execute("PRAGMA table_info(a)")] == ["x"]


def test_feedback_always_trains_even_from_a_held_out_domain(tmp_path: Path) -> None:
    fb = tmp_path / "feedback"
    make_db(fb / "databases" / "game.sqlite", GAME_DDL, GAME_ROWS)
    write_jsonl(
        fb / "feedback.jsonl",
        [
            {
                "id": "feedback-1",
                "db_id": "game",
                "domain": "game",
                "question": "Which player names start with the letter Z?",
                "sql": "SELECT username FROM players WHERE username LIKE 'Z%'",
                "source": "feedback",
            }
        ],
    )
    missing = SourceConfig(type="feedback", path=tmp_path / "none-yet")  # no feedback yet: fine
    src = SourceConfig(type="feedback", path=fb)
    prepare.run(
        _cfg(SourceConfig(type="synthetic"), src, missing),
        42,
        _synthetic(tmp_path / "syn"),
        tmp_path / "out",
    )
    train = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert [r["id"] for r in train if r["source"] == "feedback"] == ["feedback-1"]
    assert all(r["domain"] == "game" for r in read_jsonl(tmp_path / "out" / "eval.jsonl"))
