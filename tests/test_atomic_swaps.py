"""Retraining never pulls the floor from under the gateway: `prepare` and the feedback export
replace what a running service reads atomically, and the gateway follows a replaced database and
never caches an empty or unreadable one.

The swaps are checked with an audit hook: before every file-system change Python reports
(rename, remove, rmtree, mkdir, ...), the hook checks what a reader would see at that moment."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipelines.config import SourceConfig, load_params
from pipelines.data import atomic, prepare
from pipelines.data.records import read_jsonl, write_jsonl
from pipelines.monitoring.feedback import export
from pipelines.serving.inference_log import InferenceLog
from pipelines.serving.routing import Route
from pipelines.serving.service import DatabaseUnavailable, Text2SQL
from tests.conftest import GAME_DDL, GAME_ROWS, SHOP_DDL, SHOP_ROWS, make_db

P = load_params()
FILLER = (
    "INSERT INTO orders SELECT 100 + i, 1, i, '2024-01-01' FROM (WITH RECURSIVE n(i) AS "
    "(SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000) SELECT i FROM n)"
)  # enough pages that a cut file loses some
_MUTATIONS = {"os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.mkdir", "shutil.move"}
_watch: list[Callable[[], str | None]] = []  # the active invariant (audit hooks stay forever)
_broken: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if _watch and event in _MUTATIONS:
        check, _watch[:] = _watch[0], []  # not re-entered by the check's own file access
        try:
            problem = check()
            if problem:
                _broken.append(f"before {event}{args}: {problem}")
        finally:
            _watch.append(check)


sys.addaudithook(_audit)


@pytest.fixture
def watch():
    """Check an invariant before every file-system change; yields the list of breaks."""
    _broken.clear()

    def start(check: Callable[[], str | None]) -> list[str]:
        _watch[:] = [check]
        return _broken

    yield start
    _watch.clear()


def _source(tmp_path: Path, prepared_dir: Path) -> SourceConfig:
    rows = read_jsonl(prepared_dir / "train.jsonl") + read_jsonl(prepared_dir / "eval.jsonl")
    write_jsonl(tmp_path / "source.jsonl", rows)
    databases = str(prepared_dir / "databases")
    return SourceConfig(type="jsonl", path=tmp_path / "source.jsonl", databases=databases)


def test_prepare_swaps_the_folder_in_and_keeps_the_old_one_on_failure(
    tmp_path, prepared_dir, watch
):
    cfg = P.data.model_copy(update={"sources": [_source(tmp_path, prepared_dir)]})
    out = tmp_path / "served"
    prepare.run(cfg, P.seed, tmp_path, out)
    db = out / "databases" / "shop.sqlite"

    def readable() -> str | None:
        if not (db.is_file() and db.stat().st_size > 0 and (out / "train.jsonl").is_file()):
            return "the served databases or train.jsonl are missing"
        return None

    broken = watch(readable)
    for _ in range(2):
        prepare.run(cfg, P.seed, tmp_path, out)
    assert broken == []
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    bad = cfg.model_copy(update={"sources": [SourceConfig(type="jsonl", path=tmp_path / "no")]})
    with pytest.raises(FileNotFoundError):
        prepare.run(bad, P.seed, tmp_path, out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert broken == [] and sorted(p.name for p in tmp_path.iterdir()) == [
        "prepared", "served", "source.jsonl"
    ]  # fmt: skip


def test_replace_dir_without_an_atomic_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # a non-Linux file system
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "f").write_text("new")
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "f").write_text("old")
    atomic.replace_dir(tmp_path / "new", tmp_path / "target")
    assert (tmp_path / "target" / "f").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["target"]


def test_the_feedback_folder_always_has_a_database_for_every_record(tmp_path, prepared_dir, watch):
    ilog = InferenceLog(f"sqlite:///{tmp_path}/log.db")
    base = {"model_version": "v1", "status": "ok", "latency_ms": 1.0, "sql": "SELECT 1"}
    shop = ilog.record(**base, db_id="shop", question="How many orders are there?", ts=1.0)
    ilog.add_feedback(shop, "wrong", "SELECT COUNT(*) FROM orders")
    out = tmp_path / "feedback"
    databases = prepared_dir / "databases"
    export(ilog.window(), databases, out, P.validate_, sample_values=0)

    def consistent() -> str | None:
        jsonl = out / "feedback.jsonl"
        if not jsonl.is_file():
            return "feedback.jsonl is missing"
        for r in read_jsonl(jsonl):
            if not (out / "databases" / f"{r['db_id']}.sqlite").is_file():
                return f"{r['db_id']}.sqlite is missing for a record of feedback.jsonl"
        return None

    broken = watch(consistent)
    game = ilog.record(**base, db_id="game", question="How many players are there?", ts=2.0)
    ilog.add_feedback(game, "wrong", "SELECT COUNT(*) FROM players")
    res = export(ilog.window(), databases, out, P.validate_, sample_values=0)
    assert res.n_verified == 2 and broken == []
    assert sorted(p.name for p in (out / "databases").iterdir()) == ["game.sqlite", "shop.sqlite"]
    assert sorted(p.name for p in out.iterdir()) == ["databases", "feedback.jsonl"]


def _service(databases: Path) -> Text2SQL:
    return Text2SQL(P.serving, databases, tokenizer=None, backend=None)


def test_the_gateway_rereads_a_replaced_database(tmp_path):
    databases = tmp_path / "databases"
    make_db(databases / "shop.sqlite", SHOP_DDL, SHOP_ROWS)
    service = _service(databases)
    assert "customers" in service.ddl("shop")
    replacement = make_db(tmp_path / "new.sqlite", GAME_DDL, GAME_ROWS)
    atomic.copy_file(replacement, databases / "shop.sqlite")
    assert "players" in service.ddl("shop") and "customers" not in service.ddl("shop")


@pytest.mark.parametrize("damage", ["empty", "truncated", "not_sqlite"])
def test_an_empty_or_broken_database_is_a_503_and_never_cached(tmp_path, damage):
    databases = tmp_path / "databases"
    good = make_db(tmp_path / "good.sqlite", SHOP_DDL, [*SHOP_ROWS, FILLER])
    databases.mkdir()
    target = databases / "shop.sqlite"
    data = good.read_bytes()
    target.write_bytes({"empty": b"", "truncated": data[:1000], "not_sqlite": b"x" * 4096}[damage])
    service = _service(databases)
    with pytest.raises(DatabaseUnavailable):
        service.ddl("shop")
    answer = asyncio.run(service.answer("How many customers?", "shop", False, Route("v1", 1)))
    assert answer.http_status == 503 and "shop" in answer.body["error"]
    shutil.copyfile(good, target)  # `prepare` finished: the next request reads it
    assert "customers" in service.ddl("shop")


def test_a_database_truncated_after_caching_fails_cleanly_on_execution(tmp_path):
    from pipelines.sql import execute

    db = make_db(tmp_path / "shop.sqlite", SHOP_DDL, [*SHOP_ROWS, FILLER])
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 3])
    res = execute(db, "SELECT COUNT(*) FROM orders", 1.0)
    assert not res.ok and "malformed" in res.error
    with pytest.raises(sqlite3.DatabaseError):
        sqlite3.connect(db).execute("SELECT COUNT(*) FROM orders").fetchall()
