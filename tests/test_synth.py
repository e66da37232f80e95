"""The synth stage: deterministic SQLite databases and executable, bilingual question/SQL pairs."""

from __future__ import annotations

import random
import re
import sqlite3
from contextlib import closing

import pytest

from pipelines import db_schema
from pipelines import sql as sqlmod
from pipelines.config import SynthConfig, load_params
from pipelines.data import synth
from pipelines.data.domains import DOMAINS
from pipelines.data.patterns import Label, Sampler, particle, render
from pipelines.data.records import DIFFICULTIES, read_jsonl
from pipelines.data.schema import Domain, Table, date, name, num, pk

KEYS = {"id", "db_id", "domain", "lang", "question", "sql", "difficulty", "source"}
PER_DOMAIN = 40
# One table, no foreign key, no category or text column: every builder that needs a join, a
# category or a text column has to skip it.
TITLE = (
    "combo",
    "빨간 파란 작은 큰",
    "회의 장보기 여행",
    "Red Blue Small Big",
    "Meeting Shopping Trip",
)
NOTES = Domain(
    name="notes",
    tables=(
        Table(
            name="notes",
            ko="메모",
            en="note",
            en_plural="notes",
            counter="개",
            rows=40,
            columns=(
                pk("note_id"),
                name("title", "제목", "title", TITLE),
                num("words", "단어 수", "word count", ("int", 5, 500)),
                date("written_at", "작성일", "date", ("date", 2022, 2024)),
                date("edited_at", "수정일", "edit date", ("after", "written_at", 0, 30), null=0.3),
            ),
        ),
    ),
)


def _cfg(domains=None, n=PER_DOMAIN, langs=("ko", "en")) -> SynthConfig:
    """params.yaml's synth block (difficulty mix, empty share) for these domains and languages."""
    update = {"domains": list(domains or DOMAINS), "examples_per_domain": n, "langs": list(langs)}
    return load_params().synth.model_copy(update=update)


def _dump(db_path) -> list[str]:
    with closing(sqlite3.connect(db_path)) as conn:
        return list(conn.iterdump())


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    stats = synth.run(_cfg(), seed=7, out_dir=out)
    return out, stats, read_jsonl(out / "examples.jsonl")


def test_writes_one_database_per_domain_and_canonical_fields(generated):
    out, stats, examples = generated
    assert sorted(p.stem for p in (out / "databases").glob("*.sqlite")) == sorted(DOMAINS)
    assert len(examples) == stats["examples"] == PER_DOMAIN * len(DOMAINS)
    assert all(set(e) == KEYS and e["source"] == "synthetic" for e in examples)
    assert all(e["db_id"] == e["domain"] for e in examples)
    assert all(re.fullmatch(rf"{e['domain']}-\d{{5}}", e["id"]) for e in examples)
    assert len({e["id"] for e in examples}) == len(examples)
    assert stats["by_domain"] == {d: PER_DOMAIN for d in DOMAINS}


def test_same_seed_gives_identical_output_and_another_seed_does_not(tmp_path):
    cfg = _cfg(["game", "library"], n=30)
    synth.run(cfg, seed=3, out_dir=tmp_path / "a")
    synth.run(cfg, seed=3, out_dir=tmp_path / "b")
    synth.run(cfg, seed=4, out_dir=tmp_path / "c")
    jsonl = {k: (tmp_path / k / "examples.jsonl").read_bytes() for k in "abc"}
    assert jsonl["a"] == jsonl["b"] and jsonl["a"] != jsonl["c"]
    for domain in cfg.domains:
        dumps = {k: _dump(tmp_path / k / "databases" / f"{domain}.sqlite") for k in "abc"}
        assert dumps["a"] == dumps["b"] and dumps["a"] != dumps["c"]


def test_every_domain_has_both_languages_and_all_difficulties(generated):
    _, stats, examples = generated
    for domain in DOMAINS:
        mine = [e for e in examples if e["domain"] == domain]
        langs = [e["lang"] for e in mine]
        assert abs(langs.count("ko") - langs.count("en")) <= 1, domain
        assert {e["difficulty"] for e in mine} == set(DIFFICULTIES), domain
    assert all(stats["by_difficulty"][d] > 0 for d in DIFFICULTIES)
    # Korean questions are written in Hangul, English ones are not.
    assert all(re.search("[가-힣]", e["question"]) for e in examples if e["lang"] == "ko")


def test_only_the_configured_languages(tmp_path):
    synth.run(_cfg(["shop"], n=12, langs=["en"]), seed=1, out_dir=tmp_path)
    assert {e["lang"] for e in read_jsonl(tmp_path / "examples.jsonl")} == {"en"}


def test_gold_sql_executes_and_mostly_returns_rows(generated):
    out, stats, examples = generated
    non_empty = 0
    for e in examples:
        assert not e["sql"].endswith(";") and sqlmod.guard(e["sql"]) == e["sql"]
        res = sqlmod.execute(out / "databases" / f"{e['db_id']}.sqlite", e["sql"], timeout_s=2.0)
        assert res.ok, (e["sql"], res.error)
        non_empty += bool(res.rows) and any(v not in (None, 0) for r in res.rows for v in r)
    assert non_empty / len(examples) >= 0.9
    assert stats["empty_share"] <= 0.1


def test_questions_are_unique_within_a_domain(generated):
    _, _, examples = generated
    pairs = [(e["domain"], e["question"]) for e in examples]
    assert len(set(pairs)) == len(pairs)


def test_sql_covers_the_spider_features(generated):
    _, _, examples = generated
    text = "\n".join(e["sql"] for e in examples)
    for feature in [
        " = ",
        " < ",
        " > ",
        " LIKE ",
        " BETWEEN ",
        " IN (",
        " IS NULL",
        " IS NOT NULL",
        "COUNT(*)",
        "AVG(",
        "SUM(",
        "MIN(",
        "MAX(",
        "GROUP BY",
        "HAVING",
        "ORDER BY",
        "LIMIT",
        "DISTINCT",
        " JOIN ",
        "(SELECT",
        "NOT IN",
        " UNION SELECT ",
        " INTERSECT SELECT ",
        " EXCEPT SELECT ",
    ]:
        assert feature in text, feature
    two_joins = [e for e in examples if e["sql"].count(" JOIN ") == 2]
    assert two_joins and {e["difficulty"] for e in two_joins} <= {"hard", "extra"}


def test_databases_have_typed_tables_with_primary_and_foreign_keys(generated):
    out, _, _ = generated
    for domain in DOMAINS:
        db = out / "databases" / f"{domain}.sqlite"
        ddl = db_schema.ddl_of(db)
        assert "PRIMARY KEY" in ddl and "FOREIGN KEY" in ddl and "REFERENCES" in ddl
        with closing(sqlite3.connect(db)) as conn:
            tables = [
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            ]
            assert 3 <= len(tables) <= 6, domain
            fks = 0
            for t in tables:
                info = conn.execute(f"PRAGMA table_info({t})").fetchall()
                assert any(col[5] for col in info), f"{domain}.{t} has no primary key"
                assert all(col[2] for col in info), f"{domain}.{t} has an untyped column"
                fks += len(conn.execute(f"PRAGMA foreign_key_list({t})").fetchall())
                assert 20 <= conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] <= 200
            assert fks >= 2, domain
            assert conn.execute("PRAGMA foreign_key_check").fetchall() == []


def test_game_players_follow_the_seed_book_and_values_are_bilingual(generated):
    out, _, _ = generated
    with closing(sqlite3.connect(out / "databases" / "game.sqlite")) as conn:
        cols = [c[1] for c in conn.execute("PRAGMA table_info(players)")]
        names = [r[0] for r in conn.execute("SELECT username FROM players")]
        joined = [r[0] for r in conn.execute("SELECT date_joined FROM players")]
    seed_book = ["player_id", "username", "email", "password_hash", "date_joined", "last_login"]
    assert cols[: len(seed_book)] == seed_book
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"\d{4}-\d{2}-\d{2}", d) for d in joined)
    with closing(sqlite3.connect(out / "databases" / "hospital.sqlite")) as conn:
        patients = [r[0] for r in conn.execute("SELECT name FROM patients")]
    assert any(re.search("[가-힣]", n) for n in patients)  # ko_KR rows
    assert any(re.fullmatch(r"[A-Za-z .'-]+", n) for n in patients)  # en_US rows


def test_every_pattern_has_three_paraphrases_per_language():
    domain = DOMAINS["game"]
    sampler = Sampler(domain, synth.generate_rows(domain, seed=0), random.Random(0))
    for pattern in synth.PATTERNS:
        draft = next(d for d in (pattern.build(sampler) for _ in range(50)) if d is not None)
        for lang in ("ko", "en"):
            general = [t for t in getattr(pattern, lang) if not t.startswith("@")]
            rendered = {render(t, draft.slots, lang) for t in general}
            assert len(rendered) >= 3, (pattern.name, lang)


def test_a_domain_without_foreign_keys_or_categories_skips_the_patterns_needing_them(
    tmp_path, monkeypatch
):
    sampler = Sampler(NOTES, synth.generate_rows(NOTES, seed=0), random.Random(0))
    drafts = {p.name: [p.build(sampler) for _ in range(20)] for p in synth.PATTERNS}
    skipped = {name for name, built in drafts.items() if not any(built)}
    assert {
        "join_project",
        "join_group_count",
        "two_joins_where",
        "top_parents_by_count",
    } <= skipped
    assert {"where_eq", "distinct", "group_count", "aggregate_where"} <= skipped  # categories
    assert not {"all_rows", "where_cmp", "where_null", "aggregate", "date_month"} & skipped
    monkeypatch.setitem(synth.DOMAINS, "notes", NOTES)
    stats = synth.run(_cfg(["notes"], n=20), seed=1, out_dir=tmp_path)
    examples = read_jsonl(tmp_path / "examples.jsonl")
    assert stats["examples"] == len(examples) == 20
    assert not any(" JOIN " in e["sql"] or "GROUP BY" in e["sql"] for e in examples)


def test_korean_particles_follow_the_last_sound():
    assert particle("레벨", "이") == "이" and particle("플레이어", "이") == "가"
    assert particle("가입일", "은") == "은" and particle("아이템", "을") == "을"
    assert particle("서울", "으로") == "로" and particle("'김'", "으로") == "으로"
    assert particle("이메일", "과") == "과" and particle("점수", "과") == "와"
    assert particle("10", "이") == "이" and particle("Gold", "이") == "가"
    slots = {"c": Label("레벨", "level"), "t": DOMAINS["game"].tables[0], "k": 5}
    assert render("{c:이} 가장 높은 {t} {k}{t_u:은} 누구야?", slots, "ko") == (
        "레벨이 가장 높은 플레이어 5명은 누구야?"
    )
    assert render("Who are the {k} {ts} with the highest {c}?", slots, "en") == (
        "Who are the 5 players with the highest level?"
    )


def test_rejects_unknown_domains_and_languages(tmp_path):
    with pytest.raises(ValueError, match="unknown synth domains"):
        synth.run(_cfg(["game", "casino"]), seed=1, out_dir=tmp_path)
    with pytest.raises(ValueError, match="langs"):
        synth.run(_cfg(["game"], langs=["fr"]), seed=1, out_dir=tmp_path)
    no_extra = _cfg(["game"]).model_copy(update={"difficulty_weights": {"easy": 1.0}})
    with pytest.raises(ValueError, match="difficulty_weights"):
        synth.run(no_extra, seed=1, out_dir=tmp_path)


def test_stale_outputs_are_removed(tmp_path):
    stale = tmp_path / "databases" / "retired.sqlite"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    synth.run(_cfg(["hr"], n=10), seed=1, out_dir=tmp_path)
    assert not stale.exists()
    assert (tmp_path / "databases" / "hr.sqlite").is_file()


def test_main_runs_the_stage_from_params(tmp_path, monkeypatch):
    p = load_params()
    small = p.model_copy(
        update={
            "paths": p.paths.model_copy(update={"synthetic": tmp_path / "synthetic"}),
            "synth": _cfg(["travel"], n=15),
        }
    )
    monkeypatch.setattr(synth, "load_params", lambda: small)
    synth.main()
    assert len(read_jsonl(tmp_path / "synthetic" / "examples.jsonl")) == 15
