"""The failure classifier on a fixed set of (gold, predicted) pairs, each labelled by hand,
including the real-schema failures issue 29 quotes."""

from __future__ import annotations

import pytest

from pipelines.eval.failures import CLASSES, classify, counts, failure_of

PLANTS = "SELECT count(*) FROM nuclear_power_plants"
PAIRS = [
    # (gold, predicted, executed, class)
    ("SELECT name FROM t", "SELECT nme FROM t", False, "not_executable"),
    (
        "SELECT name FROM a INTERSECT SELECT name FROM b",
        "SELECT a.name FROM a JOIN b ON a.id = b.id",
        True,
        "set_operation",
    ),
    (
        "SELECT name FROM a UNION SELECT name FROM b",
        "SELECT name FROM a EXCEPT SELECT name FROM b",
        True,
        "set_operation",
    ),
    (
        "SELECT name FROM s WHERE id NOT IN (SELECT s_id FROM e)",
        "SELECT name FROM s WHERE id != 1",
        True,
        "nesting",
    ),
    ("SELECT count(*) FROM players", "SELECT count(*) FROM items", True, "wrong_table"),
    (
        "SELECT T1.name FROM a AS T1 JOIN b AS T2 ON T1.id = T2.a_id",
        "SELECT name FROM a",
        True,
        "join_path",
    ),
    (
        "SELECT T1.name FROM a AS T1 JOIN b AS T2 ON T1.id = T2.a_id",
        "SELECT T1.name FROM a AS T1 JOIN b AS T2 ON T1.code = T2.code",
        True,
        "join_path",
    ),
    (
        "SELECT T1.name FROM a AS T1 JOIN b AS T2 ON T1.id = T2.a_id",
        "SELECT c.name FROM c JOIN d ON c.id = d.c_id",
        True,
        "wrong_table",
    ),
    # issue 29: "How many operating nuclear station in France?"
    (
        "SELECT count(*) FROM nuclear_power_plants WHERE Country = 'France' "
        "AND Status = 'Operational'",
        PLANTS,
        True,
        "missing_condition",
    ),
    # "teachers aged either 32 or 33": the filter is gone (before the projection counts)
    (
        "SELECT name FROM teacher WHERE age = 32 OR age = 33",
        "SELECT * FROM teacher",
        True,
        "missing_condition",
    ),  # fmt: skip
    (
        "SELECT name FROM p WHERE age > 30",
        "SELECT name FROM p WHERE age > 30 AND country = 'France'",
        True,
        "extra_condition",
    ),
    (
        "SELECT name FROM p WHERE country = 'France'",
        "SELECT name FROM p WHERE name = 'France'",
        True,
        "wrong_column",
    ),  # fmt: skip
    (
        "SELECT count(*) FROM plants WHERE Status = 'Under Construction'",
        "SELECT count(*) FROM plants WHERE status = 'In Preparation'",
        True,
        "wrong_literal",
    ),
    (
        "SELECT name FROM p WHERE age > 30",
        "SELECT name FROM p WHERE age >= 30",
        True,
        "wrong_literal",
    ),  # fmt: skip
    ("SELECT name FROM p WHERE age > 30", "SELECT name FROM p WHERE age > 30.0", True, "other"),
    # "which ... the most" without GROUP BY
    (
        "SELECT Location FROM crime GROUP BY Location ORDER BY count(*) DESC LIMIT 1",
        "SELECT Location FROM crime ORDER BY Location DESC LIMIT 1",
        True,
        "grouping",
    ),
    (
        "SELECT team FROM g GROUP BY team HAVING count(*) > 2",
        "SELECT team FROM g GROUP BY team HAVING count(*) > 3",
        True,
        "grouping",
    ),
    ("SELECT avg(age) FROM p", "SELECT max(age) FROM p", True, "wrong_aggregate"),
    ("SELECT count(DISTINCT city) FROM p", "SELECT count(city) FROM p", True, "wrong_aggregate"),
    ("SELECT name, age FROM p", "SELECT name FROM p", True, "wrong_column"),
    ("SELECT T1.name FROM p AS T1", "SELECT p.email FROM p", True, "wrong_column"),
    (
        "SELECT name FROM p ORDER BY age DESC LIMIT 3",
        "SELECT name FROM p ORDER BY age LIMIT 3",
        True,
        "order_limit",
    ),
    (
        "SELECT name FROM p ORDER BY age LIMIT 1",
        "SELECT name FROM p ORDER BY age LIMIT 3",
        True,
        "order_limit",
    ),  # fmt: skip
    ("SELECT DISTINCT name FROM p", "SELECT name FROM p", True, "other"),
    (
        "SELECT name FROM p WHERE a = 1 AND b = 2",
        "SELECT name FROM p WHERE a = 1 OR b = 2",
        True,
        "other",
    ),  # fmt: skip
]


@pytest.mark.parametrize(("gold", "pred", "executed", "expected"), PAIRS)
def test_each_pair_gets_its_class(gold: str, pred: str, executed: bool, expected: str) -> None:
    assert classify(gold, pred, executed) == expected


def test_every_class_is_exercised_and_counted() -> None:
    assert {c for *_, c in PAIRS} == set(CLASSES)
    rows = [
        {"gold_sql": g, "pred_sql": p, "valid": ok, "execution_match": False}
        for g, p, ok, _ in PAIRS
    ] + [{"gold_sql": PLANTS, "pred_sql": PLANTS, "valid": True, "execution_match": True}]
    for r in rows:
        r["failure"] = failure_of(r)
    assert rows[-1]["failure"] is None  # a right answer has no failure class
    found = counts(rows)
    assert list(found) == list(CLASSES) and sum(found.values()) == len(PAIRS)
    assert found["missing_condition"] == 2 and found["wrong_column"] == 3
