"""Schema renaming for training: consistent in DDL and SQL, literals and keywords untouched."""

from __future__ import annotations

import sqlite3

from pipelines.data.augment import (
    _column_variants,
    _table_variants,
    augment,
    rename_ddl,
    rename_map,
    rename_sql,
    schema_names,
)
from pipelines.data.records import read_jsonl

DDL = (
    "CREATE TABLE orders (order_id INTEGER PRIMARY KEY, status TEXT NOT NULL, "
    "customer_id INTEGER, FOREIGN KEY (customer_id) REFERENCES customers (customer_id));"
)


def test_schema_names_skip_constraints():
    assert schema_names(DDL) == (["orders"], ["order_id", "status", "customer_id"])


def test_renaming_keeps_literals_and_avoids_keywords():
    import random

    mapping = {"orders": "tbl_orders", "status": "status_value"}
    sql = rename_sql("SELECT status FROM orders WHERE status = 'status'", mapping)
    assert sql == "SELECT status_value FROM tbl_orders WHERE status_value = 'status'"
    assert "tbl_orders (order_id" in rename_ddl(DDL, mapping)
    for seed in range(50):  # "orders" -> "order" would be a keyword
        assert "order" not in rename_map(DDL, random.Random(seed), 1.0, 1.0).values()


def test_augmented_examples_execute_and_share_few_ddls(prepared_dir):
    records = read_jsonl(prepared_dir / "train.jsonl")
    out = augment(records, share=1.0, variants=2, seed=0, p_table=0.5, p_column=0.4)
    assert len(out) == len(records) and len({r["ddl"] for r in out}) <= 2
    assert sum(a["sql"] != b["sql"] for a, b in zip(records, out, strict=True)) > 0
    for r in out:
        db = sqlite3.connect(":memory:")
        db.executescript(r["ddl"])
        db.execute(r["sql"]).fetchall()  # every renamed name exists in the renamed schema
    kept = augment(records, share=0.0, variants=2, seed=0, p_table=0.5, p_column=0.4)
    assert kept == records


def test_renamings_include_the_naming_habits_of_real_schemas():
    assert {"tot_amt", "totalAmount", "col_total_amount"} <= set(_column_variants("total_amount"))
    assert {"cust_id", "customerId", "customer_no"} <= set(_column_variants("customer_id"))
    assert "nm" in _column_variants("name") and "paid_value" in _column_variants("paid")
    assert {"ord_items", "orderItems", "t_order_items", "order_item"} <= set(
        _table_variants("order_items")
    )
