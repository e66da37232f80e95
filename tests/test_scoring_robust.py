"""Model output never crashes the scorer, a crash later in an evaluation keeps the finished
models' predictions, and a Spider-format import names the databases it lacks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pipelines import sql as sqlmod
from pipelines.config import SourceConfig, load_params
from pipelines.data import sources
from pipelines.data.records import read_jsonl
from pipelines.eval.evaluate import evaluate_models, gold_results
from pipelines.eval.metrics import score_example
from pipelines.model.backends import ModelSpec
from pipelines.model.decoding import GREEDY
from pipelines.vllm_runtime import VLLMRuntime
from tests.conftest import GAME_DDL, GAME_ROWS, make_db

P = load_params()
# Echoed DDL and other output on which sqlglot itself raises (AttributeError, TypeError).
CRASHING_OUTPUT = [
    "CREATE TABLE t (u CONSTRAINT PRIMARY )",
    "CREATE TABLE t (NOCASE ) DEFAULT ON STORED ) DEFERRABLE REFERENCES DEFERRABLE UNIQUE ROWID",
    "CREATE DEFAULT VIRTUAL fts5 = GENERATED ON PRIMARY REPLACE a STORED",
    "SELECT " + "(" * 60 + "1" + ")" * 60,
    "SELECT " + "NOT " * 3000 + "1",
]


@pytest.mark.parametrize("output", CRASHING_OUTPUT)
def test_output_that_crashes_sqlglot_is_not_a_match(tmp_path, output):
    db = make_db(tmp_path / "game.sqlite", GAME_DDL, GAME_ROWS)
    gold_sql = "SELECT COUNT(*) FROM players ORDER BY 1"
    gold = sqlmod.execute(db, gold_sql, 1.0)
    pred = sqlmod.execute(db, output, 1.0)
    row = score_example(gold_sql, gold, output, pred, 1e-6)
    assert row["execution_match"] is False and row["exact_match"] is False
    assert row["valid"] is False and row["error"]


def test_finished_models_predictions_survive_a_later_crash(tmp_path, tiny_base_dir, prepared_dir):
    records = read_jsonl(prepared_dir / "eval.jsonl")[:2]
    db_dir = prepared_dir / "databases"
    cfg = P.evaluate.model_copy(
        update={"backend": "transformers", "max_new_tokens": 4, "batch_size": 2}
    )
    gold = gold_results(records, db_dir, cfg.sql_timeout_s)

    def gone() -> ModelSpec:
        raise FileNotFoundError("the registered version's files are gone")

    predictions = tmp_path / "report" / "predictions.jsonl"
    models = {"first": lambda: ModelSpec(tiny_base_dir), "second": gone}
    with pytest.raises(FileNotFoundError):
        evaluate_models(
            models, records, gold, db_dir, cfg, 0, tmp_path / "judge.sqlite",
            VLLMRuntime.of(P), GREEDY, predictions,
        )  # fmt: skip
    written = read_jsonl(predictions)
    assert [r["model"] for r in written] == ["first", "first"]
    assert [r["id"] for r in written] == [r["id"] for r in records]


def test_spider_import_names_missing_databases_and_skips_their_questions(tmp_path, caplog):
    root = tmp_path / "spider"
    make_db(root / "database" / "game" / "game.sqlite", GAME_DDL, GAME_ROWS)
    (root / "database" / "empty").mkdir(parents=True)
    (root / "database" / "empty" / "empty.sqlite").write_bytes(b"")  # an interrupted download
    questions = [
        {"db_id": "game", "question": "How many players?", "query": "SELECT COUNT(*) FROM players"},
        {"db_id": "lost", "question": "How many ships?", "query": "SELECT COUNT(*) FROM ships"},
        {"db_id": "empty", "question": "How many cars?", "query": "SELECT COUNT(*) FROM cars"},
        {"db_id": "../../etc", "question": "Anything?", "query": "SELECT 1"},
    ]
    (root / "dev.json").write_text(json.dumps(questions))
    with caplog.at_level(logging.WARNING, logger="pipelines.data.sources"):
        imported = sources.load(SourceConfig(type="spider", path=root), tmp_path)
    assert [r["db_id"] for r in imported.records] == ["game"]
    assert set(imported.databases) == {"game"}
    text = caplog.text
    assert "database lost is missing" in text and "dev[1]" in text
    assert "database empty is missing" in text and "dev[2]" in text
    assert "'../../etc'" in text
    assert sorted(p.name for p in Path(root / "database").iterdir()) == ["empty", "game"]
