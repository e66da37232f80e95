"""Joins where a database declares no foreign keys: keys inferred from key-like names, naming
conventions, value overlap and lookup columns (pipelines/inferred_joins.py), allowed by the
schema grammar, kept as paths by the schema filter and listed in the prompt's DDL; attribute
columns that merely share a name (`year`, `name`) are never a join."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import load_params
from pipelines.data.schema_fit import fit_schema, prompt_ddl, split_ddl
from pipelines.db_schema import ddl_of
from pipelines.inferred_joins import inferred_joins, key_parts
from pipelines.model.grammar import read_schema, schema_grammar
from tests.conftest import make_db
from tests.test_decoding import matcher

P = load_params()
NO_LINKS = P.data.value_links.model_copy(update={"enabled": False})

# A CSV-import-like database: no table declares a key.
UNDECLARED = """
CREATE TABLE revenue (state_code TEXT, year INTEGER, name TEXT, federal REAL);
CREATE TABLE scores (state_code TEXT, year INTEGER, name TEXT, avg_score REAL);
CREATE TABLE filler_one (label TEXT, year INTEGER, weight REAL, height REAL, colour TEXT,
                         origin TEXT);
CREATE TABLE filler_two (label TEXT, year INTEGER, width REAL, depth REAL, shade TEXT, origin TEXT);
CREATE TABLE yr (year INTEGER, n INTEGER);
CREATE TABLE states (state_code TEXT PRIMARY KEY, state_name TEXT);
CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT);
CREATE TABLE orders (order_id INTEGER PRIMARY KEY, customer_id INTEGER, total REAL);
CREATE TABLE payments (payment_id INTEGER PRIMARY KEY, customer_id INTEGER, amount REAL);
CREATE TABLE batches_a (batch_code TEXT, qty INTEGER);
CREATE TABLE batches_b (batch_code TEXT, price REAL);
CREATE TABLE region_info (region TEXT, area REAL);
CREATE TABLE visits (region TEXT, visitors INTEGER);
"""
CODES = ["AK", "AL", "AZ", "CA", "CO"]


def _rows() -> list[str]:
    rows = [f"INSERT INTO states VALUES ('{c}', 'State {c}')" for c in CODES]
    for i, c in enumerate(CODES):
        rows.append(f"INSERT INTO revenue VALUES ('{c}', {2000 + i}, 'n{i}', {i * 10.0})")
        rows.append(f"INSERT INTO scores VALUES ('{c}', {2000 + i}, 'n{i}', {200.0 + i})")
        rows.append(f"INSERT INTO customers VALUES ({i + 1}, 'c{i}')")
        rows.append(f"INSERT INTO orders VALUES ({i + 1}, {i + 1}, 9.5)")
        rows.append(f"INSERT INTO payments VALUES ({i + 1}, {i + 1}, 9.5)")
        rows.append(f"INSERT INTO batches_a VALUES ('A{i}', {i})")  # same name, other values
        rows.append(f"INSERT INTO batches_b VALUES ('B{i}', {i})")
        rows.append(f"INSERT INTO region_info VALUES ('Region {c}', {i})")
        rows += [f"INSERT INTO visits VALUES ('Region {c}', {i})"] * 2
    return rows


@pytest.fixture
def undeclared(tmp_path: Path) -> Path:
    return make_db(tmp_path / "undeclared.sqlite", UNDECLARED, _rows())


def _pairs(db: Path) -> set[tuple[str, str, str, str]]:
    return {(j.table, j.column, j.ref_table, j.ref_column) for j in inferred_joins(db)}


def test_key_like_names():
    assert key_parts("customer_id") == ("customer", "id")
    assert key_parts("StuID") == ("stu", "id")
    assert key_parts("state_code") == ("state", "code")
    assert key_parts("id") == ("", "id")
    assert key_parts("year") is None and key_parts("name") is None and key_parts("paid") is None


def test_infers_keys_by_name_and_convention_and_never_between_attributes(undeclared):
    pairs = _pairs(undeclared)
    assert ("revenue", "state_code", "states", "state_code") in pairs  # convention: state -> states
    assert ("scores", "state_code", "states", "state_code") in pairs
    assert ("orders", "customer_id", "customers", "id") in pairs  # x_id -> x's primary key
    assert ("payments", "customer_id", "customers", "id") in pairs
    linked = {frozenset((a, b)) for a, _, b, _ in pairs}
    # Siblings (both keys to customers / states) are not joined to each other ...
    assert frozenset(("orders", "payments")) not in linked
    assert frozenset(("revenue", "scores")) not in linked
    # ... nor tables sharing only attributes (year, name, label), nor a key-like name whose
    # stored values never meet.
    assert frozenset(("filler_one", "filler_two")) not in linked
    assert frozenset(("batches_a", "batches_b")) not in linked
    # A lookup: the same text column, unique in one table, holding the other's values.
    assert ("visits", "region", "region_info", "region") in pairs
    # `name` is unique in revenue and in scores and their values are the same, but a name is an
    # attribute, not a key (asserted above: revenue and scores are not joined).
    assert {j.how for j in inferred_joins(undeclared)} == {"convention", "lookup"}


def test_same_key_name_across_tables_without_a_parent_table(tmp_path):
    db = make_db(
        tmp_path / "three.sqlite",
        "CREATE TABLE finance (state_code TEXT, total REAL, year INTEGER);"
        "CREATE TABLE math (state_code TEXT, score REAL, year INTEGER);"
        "CREATE TABLE ndecoreexcel (state_code TEXT, avg_score REAL, year INTEGER);",
        [f"INSERT INTO {t} VALUES ('{c}', 1.0, 2000)" for t in ("finance", "math", "ndecoreexcel")
         for c in CODES],
    )  # fmt: skip
    linked = {frozenset((a, b)): (c, d) for a, c, b, d in _pairs(db)}
    assert set(linked) == {
        frozenset(("finance", "math")),
        frozenset(("finance", "ndecoreexcel")),
        frozenset(("math", "ndecoreexcel")),
    }
    assert set(linked.values()) == {("state_code", "state_code")}  # never year = year


def test_a_declared_key_is_kept_and_nothing_inferred_beside_it(tmp_path):
    db = make_db(
        tmp_path / "declared.sqlite",
        "CREATE TABLE customers (customer_id INTEGER PRIMARY KEY, name TEXT);"
        "CREATE TABLE orders (order_id INTEGER PRIMARY KEY, "
        "customer_id INTEGER REFERENCES customers(customer_id));",
        ["INSERT INTO customers VALUES (1, 'a')", "INSERT INTO orders VALUES (1, 1)"],
    )
    assert inferred_joins(db) == ()
    ddl = ddl_of(db)
    assert prompt_ddl(ddl, "orders?", 6000, db, inferred=True, value_links=NO_LINKS) == ddl


def test_the_grammar_accepts_the_inferred_join_and_refuses_unrelated_columns(undeclared):
    accepts = matcher(schema_grammar(undeclared, P.decoding))
    on_key = "FROM revenue AS r JOIN states AS s ON r.state_code = s.state_code"
    assert accepts(f"SELECT s.state_name, r.federal {on_key};")
    assert accepts("SELECT s.state_name FROM revenue AS r JOIN states AS s ON s.state_code = "
                   "r.state_code WHERE r.year = 2001;")  # fmt: skip
    assert accepts("SELECT c.name, COUNT(*) FROM orders AS o JOIN customers AS c "
                   "ON o.customer_id = c.id GROUP BY c.name;")  # fmt: skip
    # Attribute columns and unrelated tables cannot be an ON condition.
    assert not accepts("SELECT r.federal FROM revenue AS r JOIN scores AS s ON r.year = s.year;")
    assert not accepts("SELECT r.federal FROM revenue AS r JOIN scores AS s ON r.name = s.name;")
    assert not accepts(
        "SELECT fo.label FROM filler_one AS fo JOIN filler_two AS ft ON fo.year = ft.year;"
    )
    assert not accepts(
        "SELECT ba.qty FROM batches_a AS ba JOIN batches_b AS bb ON ba.batch_code = bb.batch_code;"
    )
    assert not accepts(f"SELECT s.state_name {on_key.replace('r.state_code', 'r.name')};")
    assert accepts(
        "SELECT ri.area, SUM(v.visitors) FROM visits AS v JOIN region_info AS ri "
        "ON v.region = ri.region GROUP BY ri.area;"
    )
    # Without the inferred keys no join at all could be written on this database.
    assert read_schema(undeclared).keys == frozenset()


def test_the_prompt_lists_inferred_joins_and_the_fit_keeps_them_as_paths(undeclared):
    ddl = ddl_of(undeclared)
    full = prompt_ddl(ddl, "anything", 10_000, undeclared, inferred=True, value_links=NO_LINKS)
    assert "-- join (inferred): revenue.state_code = states.state_code" in full.splitlines()
    assert "-- join (inferred): orders.customer_id = customers.id" in full.splitlines()
    assert prompt_ddl(ddl, "x", 10_000, undeclared, inferred=False, value_links=NO_LINKS) == ddl
    # Built twice, the lines are not doubled.
    assert prompt_ddl(full, "x", 10_000, undeclared, inferred=True, value_links=NO_LINKS) == full
    # A question naming revenue and scores: their shared parent `states` (known only from the
    # inferred keys) is kept as the path between them, before `yr`, which the question names
    # (year) and which the fit takes instead without the inferred keys.
    statements = {t.name: t.statement for t in split_ddl(ddl)}
    budget = sum(len(statements[t]) + 1 for t in ("revenue", "scores", "states")) + 20
    lines = [x for x in full.splitlines() if x.startswith("-- join")]
    question = "federal revenue and avg score per year"
    fitted = prompt_ddl(
        ddl, question, budget + sum(len(x) + 1 for x in lines), undeclared,
        inferred=True, value_links=NO_LINKS,
    )  # fmt: skip
    assert [t.name for t in split_ddl(fitted)] == ["revenue", "scores", "states"]
    assert [x for x in fitted.splitlines() if x.startswith("-- join")] == [
        x for x in lines if "state_code" in x
    ]
    plain = [t.name for t in split_ddl(fit_schema(ddl, question, budget))]
    assert plain == ["revenue", "scores", "yr"]
