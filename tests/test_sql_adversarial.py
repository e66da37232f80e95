"""Adversarial SQL against the one SQL module: every input is refused, bounded, or executed
correctly, never a crash, never past the time limit + margin or the memory limit.

Each case names what must happen: `refused` (the guard says no before SQLite sees it),
`bounded` (it runs and is stopped by a limit with a clean error), `correct` (valid read-only SQL
that must run and give these rows). `python -m tests.test_sql_adversarial` runs every case once
more and prints the counts, the worst time and the worst worker peak memory (VmHWM).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from pipelines import sql as sqlmod
from pipelines.config import load_params
from tests.conftest import SHOP_DDL, SHOP_ROWS, make_db

TIMEOUT_S = 1.0
LIMITS = load_params().replace(sql={"max_memory_mb": 192, "kill_margin_s": 0.5}).sql
SLACK_S = 1.0  # a worker restart and a loaded 2-core machine
# What a limit says when it stops a query; which one comes first can depend on the machine.
LIMIT_ERRORS = ("too big", "memory limit", "timeout", "result larger", "too large", "too many")
R = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {}) "

REFUSED = {
    "pragma_tvf": "SELECT * FROM pragma_database_list",
    "pragma_tvf_args": "SELECT * FROM pragma_table_info('customers')",
    "pragma_tvf_schema": "SELECT file FROM main.pragma_database_list",
    "pragma_tvf_quoted": """SELECT name FROM "PRAGMA_TABLE_INFO"('orders')""",
    "pragma_in_subquery": (
        "SELECT 1 FROM customers WHERE name IN (SELECT name FROM pragma_table_xinfo)"
    ),
    "pragma_in_cte": "WITH p AS (SELECT * FROM pragma_database_list) SELECT * FROM p",
    "fts3_tokenizer": "SELECT fts3_tokenizer('simple')",
    "load_extension": "SELECT load_extension('/tmp/evil.so')",
    "pragma": "PRAGMA table_info(customers)",
    "pragma_write": "PRAGMA query_only = OFF",
    "attach": "ATTACH DATABASE '/tmp/x.db' AS x",
    "detach": "DETACH DATABASE main",
    "vacuum": "VACUUM",
    "vacuum_into": "VACUUM INTO '/tmp/copy.db'",
    "drop": "DROP TABLE customers",
    "stacked": "SELECT 1; DROP TABLE customers",
    "cte_delete": "WITH x AS (SELECT 1) DELETE FROM orders",
    "insert_select": "INSERT INTO orders SELECT * FROM orders",
    "replace_into": "REPLACE INTO customers VALUES (9, 'x', 'y')",
    "update": "UPDATE customers SET name = 'x'",
    "create_as": "CREATE TABLE t AS SELECT 1",
    "reindex": "REINDEX",
    "analyze": "ANALYZE",
    "savepoint": "SAVEPOINT a",
    "begin": "BEGIN IMMEDIATE",
    "parens_50": "SELECT " + "(" * 50 + "1" + ")" * 50,
    "subqueries_300": "SELECT * FROM " + "(SELECT * FROM " * 300 + "customers" + ")" * 300,
    "not_chain": "SELECT " + "NOT " * 3000 + "1",
    "too_long": "SELECT name FROM customers WHERE name = '" + "x" * 30_000 + "'",
    "unterminated": "SELECT 'no end FROM customers",
    "empty": "   ",
    "only_semicolon": ";",
    "garbage": "SELEC name FRM customers",
}
BOUNDED = {
    "printf_width": ("SELECT printf('%.*c', 1000000000, 'x')", "timeout"),
    "randomblob": ("SELECT randomblob(1e9)", "too big"),
    "zeroblob": ("SELECT zeroblob(1e9)", "too big"),
    "zeroblob_rows": ("SELECT zeroblob(100000000) FROM customers LIMIT 100", "too big"),
    "replace_growth": (
        "SELECT replace(replace(replace(replace(hex(zeroblob(10000)), '0', '0000000000'),"
        " '0', '0000000000'), '0', '0000000000'), '0', '00')",
        "too big",
    ),
    "group_concat": (R.format(100_000) + "SELECT group_concat(hex(randomblob(500))) FROM n", "big"),
    "json_group_array": (
        R.format(100_000) + "SELECT json_group_array(hex(randomblob(500))) FROM n",
        "",  # JSON checks its length at the end: memory or the clock stops it first
    ),
    "result_bytes": (R.format(100) + "SELECT randomblob(900000) FROM n", "result larger"),
    "endless_cte": (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT COUNT(*) FROM n",
        "timeout",
    ),
    "distinct_memory": (
        R.format(3_000_000) + "SELECT COUNT(*) FROM (SELECT DISTINCT hex(randomblob(200)) FROM n)",
        "",  # the heap limit, or the clock, whichever comes first
    ),
    "cross_join": (
        "SELECT COUNT(*) FROM customers a, customers b, customers c, customers d, customers e, "
        + ", ".join(f"orders o{i}" for i in range(12)),
        "timeout",
    ),
    "operator_chain": ("SELECT " + "+".join(["1"] * 5000), "too large"),
    "string_doubling": (
        "WITH RECURSIVE s(x) AS (SELECT 'a' UNION ALL SELECT x || x FROM s) "
        "SELECT length(x) FROM s",
        "too big",
    ),
    "many_args": ("SELECT char(" + ", ".join(["65"] * 500) + ")", "too many arguments"),
}
CORRECT = {
    "keyword_vacuum_literal": ("SELECT name FROM customers WHERE name = 'Vacuum'", []),
    "keyword_attach_literal": ("SELECT 'attach'", [("attach",)]),
    "keyword_pragma_literal": (
        "SELECT 'PRAGMA table_info(x)' AS detach",
        [("PRAGMA table_info(x)",)],
    ),
    "keyword_column_alias": (
        "SELECT city AS vacuum FROM customers WHERE name = 'Kim'",
        [("Seoul",)],
    ),
    "infinity": ("SELECT 1e999", [(float("inf"),)]),
    "blob": ("SELECT x'00ff'", [(b"\x00\xff",)]),
    "json_each": ("SELECT value FROM json_each('[1, 2]')", [(1,), (2,)]),
    "nested_ok": ("SELECT ((((1))))", [(1,)]),
}


@pytest.fixture(scope="module")
def shop_db(tmp_path_factory) -> Path:
    return make_db(tmp_path_factory.mktemp("adv") / "shop.sqlite", SHOP_DDL, SHOP_ROWS)


def run(db: Path, sql: str) -> tuple[sqlmod.ExecResult, float]:
    start = time.monotonic()
    res = sqlmod.execute(db, sql, TIMEOUT_S, max_rows=10_000, limits=LIMITS)
    return res, time.monotonic() - start


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_before_execution(shop_db, name):
    res, seconds = run(shop_db, REFUSED[name])
    assert res.error and res.error.startswith("rejected"), res.error
    assert seconds < 1.0
    with pytest.raises(sqlmod.UnsafeSQL):
        sqlmod.guard(REFUSED[name], LIMITS)


@pytest.mark.parametrize("name", sorted(BOUNDED))
def test_bounded_with_a_clean_error(shop_db, name):
    sql, reason = BOUNDED[name]
    res, seconds = run(shop_db, sql)
    assert not res.ok and reason in res.error or res.error == "memory limit", res.error
    assert any(e in res.error for e in LIMIT_ERRORS), res.error
    assert seconds < TIMEOUT_S + LIMITS.kill_margin_s + SLACK_S


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_valid_read_only_sql_runs_and_json_can_carry_it(shop_db, name):
    sql, rows = CORRECT[name]
    res, _ = run(shop_db, sql)
    assert res.ok, res.error
    assert res.rows == rows
    json.dumps(sqlmod.json_rows(res.rows), allow_nan=False)  # what the gateway sends


def test_json_values_are_encoded():
    assert sqlmod.json_rows([(float("inf"), float("-inf"), float("nan"), b"\x01", 1, "a")]) == [
        ["inf", "-inf", "nan", "01", 1, "a"]
    ]


def test_the_database_is_unchanged_and_the_executor_still_answers(shop_db):
    before = shop_db.read_bytes()
    for sql in REFUSED.values():
        run(shop_db, sql)
    assert shop_db.read_bytes() == before
    assert run(shop_db, "SELECT COUNT(*) FROM orders")[0].rows == [(4,)]


def test_concurrent_queries_share_the_pool_and_a_killed_worker_is_replaced(shop_db):
    results: list[sqlmod.ExecResult] = []

    def ask(sql: str) -> None:
        results.append(run(shop_db, sql)[0])

    threads = [threading.Thread(target=ask, args=(BOUNDED["printf_width"][0],))] + [
        threading.Thread(target=ask, args=("SELECT COUNT(*) FROM customers",)) for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.error or "ok" for r in results) == ["ok"] * 6 + ["timeout"]
    assert run(shop_db, "SELECT COUNT(*) FROM customers")[0].rows == [(3,)]


def test_guard_and_parse_never_raise_recursion_error():
    for sql in (REFUSED["parens_50"], REFUSED["subqueries_300"], REFUSED["not_chain"]):
        with pytest.raises(sqlmod.UnsafeSQL, match="nested"):
            sqlmod.parse(sql, LIMITS)
    # sqlglot's parser raises AttributeError/TypeError on some echoed CREATE TABLEs
    for echoed in (
        "CREATE TABLE t (u CONSTRAINT PRIMARY )",
        "CREATE DEFAULT VIRTUAL fts5 = GENERATED",
    ):
        with pytest.raises(sqlmod.UnsafeSQL if "TABLE" in echoed else ValueError):
            sqlmod.guard(echoed, LIMITS)
        assert sqlmod.normalize(echoed) == " ".join(echoed.lower().split())
    assert sqlmod.verify(REFUSED["parens_50"], None, None, 1.0).failure == "sql_parses"


def _sample_children(peak: dict[int, int], stop: threading.Event) -> None:
    """Peak resident memory (VmHWM, kB) of every child process, sampled until `stop`."""
    me = str(os.getpid())
    while not stop.is_set():
        for proc in Path("/proc").iterdir():
            try:
                status = (proc / "status").read_text()
            except OSError:
                continue
            fields = dict(ln.split(":", 1) for ln in status.splitlines() if ":" in ln)
            if fields.get("PPid", "").strip() == me and "VmHWM" in fields:
                kb = int(fields["VmHWM"].split()[0])
                peak[int(proc.name)] = max(peak.get(int(proc.name), 0), kb)
        time.sleep(0.01)


def main() -> None:
    """Every case once, with the workers' peak memory sampled from /proc."""
    import tempfile

    db = make_db(Path(tempfile.mkdtemp()) / "shop.sqlite", SHOP_DDL, SHOP_ROWS)
    cases = [("refused", s, None) for s in REFUSED.values()]
    cases += [("bounded", s, r) for s, r in BOUNDED.values()]
    cases += [("correct", s, rows) for s, rows in CORRECT.values()]
    counts = {"refused": 0, "bounded": 0, "correct": 0, "wrong": 0, "crash": 0}
    worst_s, peak, stop = 0.0, {}, threading.Event()
    sampler = threading.Thread(target=_sample_children, args=(peak, stop), daemon=True)
    sampler.start()
    for kind, sql, expect in cases:
        try:
            res, seconds = run(db, sql)
        except Exception:  # what the executor must never do
            counts["crash"] += 1
            continue
        worst_s = max(worst_s, seconds)
        ok = {
            "refused": bool(res.error and res.error.startswith("rejected")),
            "bounded": not res.ok and any(e in (res.error or "") for e in LIMIT_ERRORS),
            "correct": res.ok and res.rows == expect,
        }[kind]
        counts[kind if ok else "wrong"] += 1
        if not ok:
            print(f"WRONG ({kind}): {sql[:80]} -> {res.error or res.rows}")
    stop.set()
    sampler.join()
    print(
        f"inputs {len(cases)}: refused {counts['refused']}, bounded {counts['bounded']}, "
        f"executed correctly {counts['correct']}, executed wrongly {counts['wrong']}, "
        f"crashes {counts['crash']}"
    )
    print(
        f"worst time {worst_s:.2f} s (limit {TIMEOUT_S} s + kill margin "
        f"{LIMITS.kill_margin_s} s); worst worker peak memory {max(peak.values()) / 1024:.0f} MB "
        f"(limit {LIMITS.max_memory_mb} MB address space)"
    )


if __name__ == "__main__":
    main()
