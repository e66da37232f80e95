"""Value linking (pipelines/data/value_links.py): the stored values a question names in its own
words reach the prompt beside their columns, the index is bounded in time and memory on a
1M-row column, and a question that names no value gets no link."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from pipelines.config import load_params
from pipelines.data.schema_fit import prompt_ddl, schema_key
from pipelines.data.value_links import build_index, index_of, link_values
from pipelines.db_schema import ddl_of
from tests.conftest import make_db

P = load_params()
CFG = P.data.value_links.model_copy(update={"enabled": True})

DDL = """
CREATE TABLE sites (site_id INTEGER PRIMARY KEY, site_name TEXT, country TEXT, status TEXT,
                    kind TEXT, capacity REAL, remarks TEXT);
CREATE TABLE crews (crew_id INTEGER PRIMARY KEY, site_id INTEGER REFERENCES sites(site_id),
                    city TEXT, lead TEXT);
"""
STATUSES = ["Operational", "Under Construction", "Shut Down", "Planned"]
COUNTRIES = ["Norway", "Portugal", "Chile", "Kenya", "Vietnam", "대한민국"]
CITIES = ["Bergen", "Porto", "Valparaiso", "Mombasa", "Da Nang", "부산"]


@pytest.fixture
def sites_db(tmp_path: Path) -> Path:
    rows = []
    for i in range(120):
        rows.append(
            "INSERT INTO sites VALUES "
            f"({i}, 'Site {i}', '{COUNTRIES[i % 6]}', '{STATUSES[i % 4]}', "
            f"'{['wind', 'solar', 'hydro'][i % 3]}', {i * 1.5}, "
            f"'a long free-text remark number {i} about the site and its many neighbours')"
        )
        rows.append(f"INSERT INTO crews VALUES ({i}, {i}, '{CITIES[i % 6]}', 'Lead {i}')")
    return make_db(tmp_path / "sites.sqlite", DDL, rows)


def _links(db: Path, question: str) -> set[tuple[str, str, str]]:
    return {(x.column, x.value, x.kind) for x in link_values(db, question, CFG)}


def test_a_paraphrased_value_is_linked_to_its_column(sites_db):
    found = _links(sites_db, "How many operating wind sites are in norway?")
    assert ("status", "Operational", "stem") in found
    assert ("country", "Norway", "case") in found
    assert ("kind", "wind", "exact") in found
    assert _links(sites_db, "Which sites are under construction?") == {
        ("status", "Under Construction", "case")
    }
    # The phrase's telling word alone, in another form; and a typo.
    assert ("status", "Under Construction", "stem") in _links(sites_db, "sites being constructed")
    assert ("country", "Portugal", "fuzzy") in _links(sites_db, "solar sites in Portugl")
    # A Korean question quotes the value with a particle attached.
    assert ("country", "대한민국", "stem") in _links(sites_db, "대한민국에 있는 발전소는 몇 개야?")
    assert ("city", "부산", "stem") in _links(sites_db, "부산의 작업조 리더를 알려줘")


def test_a_question_naming_no_value_gets_no_link(sites_db):
    for question in (
        "How many sites are there?",
        "What is the average capacity of all sites?",
        "List the site names and the city of each crew ordered by capacity.",
        "Which status has the most sites?",
    ):
        assert link_values(sites_db, question, CFG) == [], question


def test_free_text_columns_and_stop_words_are_not_indexed(sites_db):
    index = build_index(sites_db, CFG)
    assert ("sites", "remarks") not in index.columns  # free text
    assert ("sites", "status") in index.columns
    assert not any(raw in ("the", "of") for _, raw in index.values)


def test_the_links_reach_the_prompt_through_the_one_builder(sites_db):
    ddl = ddl_of(sites_db)
    question = "How many operating sites are in Chile?"
    built = prompt_ddl(ddl, question, 6000, sites_db, inferred=True, value_links=CFG)
    assert built.splitlines()[-2:] == [
        "-- matches: sites.country = 'Chile'",
        "-- matches: sites.status = 'Operational'",
    ]
    assert schema_key(built) == ddl  # batches and renamings still group by schema
    off = prompt_ddl(ddl, question, 6000, sites_db, inferred=True, value_links=P.data.value_links)
    assert off == ddl  # params.yaml: off until measured
    assert P.data.value_links.enabled is False
    assert P.serving.value_links == P.data.value_links  # the gateway builds it as trained
    assert P.serving.inferred_joins == P.data.inferred_joins
    # A value line counts against the schema budget; its table is kept by the fit.
    tight = prompt_ddl(ddl, question, len(ddl) - 10, sites_db, inferred=True, value_links=CFG)
    assert tight.startswith("CREATE TABLE sites") and "-- matches: sites.status" in tight
    assert len(tight) <= len(ddl) - 10


def test_the_index_is_built_once_per_database_and_again_when_it_changes(sites_db):
    first = index_of(sites_db, CFG)
    assert index_of(sites_db, CFG) is first
    with sqlite3.connect(sites_db) as conn:
        conn.execute("INSERT INTO sites (site_id, status) VALUES (999, 'Decommissioned')")
    time.sleep(0.01)
    again = index_of(sites_db, CFG)
    assert again is not first and ("status", "Decommissioned", "case") in {
        (x.column, x.value, x.kind) for x in link_values(sites_db, "decommissioned sites", CFG)
    }


def test_the_index_is_bounded_in_time_and_memory_on_a_million_rows(tmp_path):
    db = tmp_path / "big.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, tag TEXT, state TEXT)")
        conn.executemany(
            "INSERT INTO events VALUES (?, ?, ?)",
            ((i, f"tag{i:07d}", ("Open", "Closed", "Pending")[i % 3]) for i in range(1_000_000)),
        )
    start = time.perf_counter()
    index = build_index(db, CFG)
    took = time.perf_counter() - start
    assert took < 5.0, f"index built in {took:.1f}s"
    # One distinct value per row in `tag`: only its bounded share is held.
    assert len(index) <= CFG.max_values_per_column + 3
    assert sum(1 for k, _ in index.values if index.columns[k] == ("events", "tag")) == (
        CFG.max_values_per_column
    )
    start = time.perf_counter()
    links = link_values(db, "How many pending events?", CFG)
    assert time.perf_counter() - start < 1.0  # built already: a lookup
    assert [(x.column, x.value) for x in links] == [("state", "Pending")]
    small = build_index(db, CFG.model_copy(update={"max_values": 1000}))
    assert len(small) == 1000 and small.truncated  # the database's bound
    late = build_index(db, CFG.model_copy(update={"max_build_s": 0.0}))
    assert len(late) == 0 and late.truncated  # the time bound
