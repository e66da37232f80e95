"""The SQL module: guard, safe execution, Spider-style comparison, extraction, DDL."""

from __future__ import annotations

import pytest

from pipelines import db_schema
from pipelines import sql as sqlmod
from tests.conftest import SHOP_DDL, SHOP_ROWS, make_db


@pytest.fixture
def shop_db(tmp_path):
    return make_db(tmp_path / "shop.sqlite", SHOP_DDL, SHOP_ROWS)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM customers",
        "select name from customers where city = 'Seoul';",
        "WITH big AS (SELECT * FROM orders WHERE amount > 10) SELECT COUNT(*) FROM big",
        "SELECT name FROM customers UNION SELECT city FROM customers",
    ],
)
def test_guard_accepts_single_read_only_queries(sql):
    assert sqlmod.guard(sql) == sql.strip().rstrip(";").strip()


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("", "empty"),
        ("DROP TABLE customers", "only SELECT"),
        ("SELECT 1; DROP TABLE customers", "exactly one"),
        ("DELETE FROM orders", "only SELECT"),
        ("PRAGMA table_info(customers)", None),
        ("ATTACH DATABASE 'x.db' AS x", None),
        ("INSERT INTO orders SELECT * FROM orders", "only SELECT"),
        ("WITH x AS (SELECT 1) DELETE FROM orders", None),
        ("SELEC name FRM customers", None),
    ],
)
def test_guard_rejects_everything_else(sql, reason):
    with pytest.raises(sqlmod.UnsafeSQL, match=reason):
        sqlmod.guard(sql)


def test_execute_is_read_only_and_capped(shop_db):
    res = sqlmod.execute(shop_db, "SELECT order_id FROM orders ORDER BY order_id", 1.0, max_rows=2)
    assert res.ok and res.rows == [(1,), (2,)] and res.truncated
    assert sqlmod.execute(shop_db, "DROP TABLE orders", 1.0).error.startswith("rejected")
    assert sqlmod.execute(shop_db, "SELECT nope FROM orders", 1.0).error.startswith("error")
    assert sqlmod.execute(shop_db, "SELECT COUNT(*) FROM orders", 1.0).rows == [(4,)]


def test_execute_stops_at_the_time_limit(shop_db):
    slow = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT COUNT(*) FROM n"
    res = sqlmod.execute(shop_db, slow, timeout_s=0.2)
    assert res.error == "timeout" and res.seconds < 2


def test_execute_missing_database(tmp_path):
    assert "not found" in sqlmod.execute(tmp_path / "x.sqlite", "SELECT 1", 1.0).error


def test_results_match_spider_semantics():
    assert sqlmod.results_match([(1, "a"), (2, "b")], [(2, "b"), (1, "a")], ordered=False)
    assert not sqlmod.results_match([(1, "a"), (2, "b")], [(2, "b"), (1, "a")], ordered=True)
    assert not sqlmod.results_match([(1,), (1,)], [(1,)], ordered=False)  # multiset, not set
    assert sqlmod.results_match([(0.1 + 0.2,)], [(0.3,)], ordered=False)
    assert sqlmod.results_match([(3,)], [(3.0,)], ordered=False)
    assert not sqlmod.results_match([(3,)], [(3.1,)], ordered=False)
    assert sqlmod.results_match([(None, 1)], [(None, 1)], ordered=False)
    assert sqlmod.results_match([], [], ordered=False)


def test_has_order_by_looks_at_the_outer_query():
    assert sqlmod.has_order_by("SELECT a FROM t ORDER BY a")
    assert not sqlmod.has_order_by(
        "SELECT a FROM t WHERE a IN (SELECT a FROM t ORDER BY a LIMIT 1)"
    )


def test_normalize_ignores_case_whitespace_and_semicolon():
    assert sqlmod.normalize("select  NAME from Customers;") == sqlmod.normalize(
        "SELECT name FROM customers"
    )


@pytest.mark.parametrize(
    ("text", "sql"),
    [
        ("SELECT a FROM t;", "SELECT a FROM t"),
        ("Sure! Here it is:\n```sql\nSELECT a\nFROM t;\n```", "SELECT a FROM t"),
        ("SELECT a FROM t; SELECT b FROM u;", "SELECT a FROM t"),
        ("WITH x AS (SELECT 1) SELECT * FROM x", "WITH x AS (SELECT 1) SELECT * FROM x"),
        ("SELECT a FROM t\n\n### Question: more", "SELECT a FROM t"),
    ],
)
def test_extract_sql(text, sql):
    assert sqlmod.extract_sql(text) == sql


def test_ddl_and_schema_of(shop_db):
    ddl = db_schema.ddl_of(shop_db)
    assert ddl.startswith("CREATE TABLE customers") and ddl.count("CREATE TABLE") == 2
    assert db_schema.schema_of(shop_db)["orders"] == [
        "order_id",
        "customer_id",
        "amount",
        "ordered_at",
    ]


def test_ddl_lists_the_values_of_category_columns(shop_db):
    from pipelines.data.augment import schema_names
    from pipelines.data.schema_fit import split_ddl

    ddl = db_schema.ddl_of(shop_db, sample_values=2)
    # city holds two values ('Seoul' twice first); name holds three: a name, not a category.
    assert "city TEXT /* 'Seoul' | 'Busan' */" in ddl
    assert "name TEXT NOT NULL," in ddl and "'Kim'" not in ddl
    assert "/*" not in db_schema.ddl_of(shop_db, sample_values=1)  # no column has a single value
    assert db_schema.ddl_of(shop_db, sample_values=0) == db_schema.ddl_of(shop_db)
    # Every reader of the prompt's DDL still sees the same tables and columns.
    assert schema_names(ddl) == schema_names(db_schema.ddl_of(shop_db))
    assert [t.words for t in split_ddl(ddl)] == [
        t.words for t in split_ddl(db_schema.ddl_of(shop_db))
    ]


def test_untokenizable_model_output_is_rejected_not_raised(shop_db):
    broken = "SELECT player_id FROM matches GROUP BY player_id HAVING COUNT(*) >= '"
    with pytest.raises(sqlmod.UnsafeSQL, match="does not parse"):
        sqlmod.guard(broken)
    assert sqlmod.execute(shop_db, broken, 1.0).error.startswith("rejected")
    assert sqlmod.normalize(broken) and not sqlmod.has_order_by(broken)
