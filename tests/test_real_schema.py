"""The real-schema set (KaggleDBQA's three databases, data.real_schema): prepared into its own
split with its databases, held to the data contract, and never reaching training, even when a
source brings its databases or its questions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipelines.config import ROOT, SourceConfig, load_params
from pipelines.data import prepare
from pipelines.data.records import question_key, read_jsonl
from pipelines.sql import normalize
from tests.conftest import make_db
from tests.test_prepare import _cfg, _synthetic

KAGGLEDBQA = ROOT / load_params().paths.real_schema
REAL_DBS = {"GeoNuclearData", "GreaterManchesterCrime", "StudentMathScore"}


def _leaky_source(root: Path) -> SourceConfig:
    """A Spider folder that reuses a real-schema database and a real-schema question."""
    dev = json.loads((KAGGLEDBQA / "dev.json").read_text())
    geo = next(r for r in dev if r["db_id"] == "GeoNuclearData")
    (root / "database" / "GeoNuclearData").mkdir(parents=True)
    shutil.copy(
        KAGGLEDBQA / "database" / "GeoNuclearData" / "GeoNuclearData.sqlite",
        root / "database" / "GeoNuclearData" / "GeoNuclearData.sqlite",
    )
    make_db(
        root / "database" / "concert" / "concert.sqlite",
        "CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT, country TEXT);",
        ["INSERT INTO singer VALUES (1, 'A', 'France')"],
    )
    rows = [
        geo,  # the real-schema question itself, on its database
        {"db_id": "GeoNuclearData", "question": "How many plants are listed?",
         "query": "SELECT count(*) FROM nuclear_power_plants"},
        {"db_id": "concert", "question": dev[0]["question"], "query": "SELECT name FROM singer"},
        {"db_id": "concert", "question": "How many singers are there?",
         "query": "SELECT count(*) FROM singer"},
    ]  # fmt: skip
    (root / "train_spider.json").write_text(json.dumps(rows))
    return SourceConfig(type="spider", path=root)


def _prepare(tmp_path: Path) -> tuple[Path, dict]:
    real = [SourceConfig(type="spider", path=KAGGLEDBQA)]
    cfg = _cfg(SourceConfig(type="synthetic"), _leaky_source(tmp_path / "leaky"), real_schema=real)
    out = tmp_path / "out"
    return out, prepare.run(cfg, 42, _synthetic(tmp_path / "syn"), out)


def test_real_schema_split_never_reaches_training(tmp_path: Path) -> None:
    out, stats = _prepare(tmp_path)
    real = read_jsonl(out / "real_schema.jsonl")
    assert len(real) == stats["n"]["real_schema"] == 59
    assert {r["db_id"] for r in real} == REAL_DBS and {r["split"] for r in real} == {"real_schema"}
    assert all(r["ddl"].startswith("CREATE TABLE") and r["lang"] == "en" for r in real)
    assert {f"{d}.sqlite" for d in REAL_DBS} <= {p.name for p in (out / "databases").iterdir()}
    # Spider's double-quoted strings are stored canonically: 'France', not "France"
    assert not any('"France"' in r["sql"] for r in real) and any(
        "'France'" in r["sql"] for r in real
    )

    others = [r for s in ("train", "eval", "selection") for r in read_jsonl(out / f"{s}.jsonl")]
    assert {r["db_id"] for r in others}.isdisjoint(REAL_DBS)
    assert {question_key(r["question"]) for r in others}.isdisjoint(
        question_key(r["question"]) for r in real
    )
    assert {normalize(r["sql"]) for r in others}.isdisjoint(normalize(r["sql"]) for r in real)
    assert stats["removed"]["real_schema_databases"] == 2  # the two GeoNuclearData questions
    assert stats["removed"]["leakage"] == 1  # a real-schema question over another database
    train = read_jsonl(out / "train.jsonl")
    assert "How many singers are there?" in {r["question"] for r in train}  # the rest trains


@pytest.mark.slow
def test_real_schema_split_meets_the_data_contract(tmp_path: Path) -> None:
    from pipelines.data import validate

    out, _ = _prepare(tmp_path)
    result = validate.run(load_params().validate_, out, tmp_path / "report")
    assert result.success, [(r.rule, r.examples) for r in result.failed]
    assert json.loads(result.summary_path.read_text())["n_by_split"]["real_schema"] == 59


def _m(ex: float) -> dict:
    return {"execution_accuracy": ex, "valid_sql_rate": 1.0, "judge_accuracy": None}


@pytest.mark.parametrize(
    ("real", "promote", "says"),
    [
        ((0.10, 0.05), True, "real-schema set: execution accuracy 0.100 vs champion 0.050"),
        ((0.04, 0.08), True, "within tolerance 0.05"),  # 4 points down: within
        ((0.02, 0.10), False, "drops beyond tolerance 0.05"),
        ((0.10, None), True, "(champion: no figure)"),  # registered before the figure
        (None, True, "real-schema set: not evaluated"),
    ],
)
def test_gate_reports_the_real_schema_set_and_refuses_a_regression(real, promote, says):
    from pipelines.release.gate import should_promote

    cfg = load_params().registry.model_copy(update={"real_schema_tolerance": 0.05})
    pair = None if real is None else tuple(None if x is None else _m(x) for x in real)
    d = should_promote(_m(0.6), _m(0.5), _m(0.1), cfg, real_schema=pair)
    assert d.promote is promote and any(says in r for r in d.reasons), d.reasons


def test_summary_lines_show_the_real_schema_row_and_failure_classes() -> None:
    from pipelines.eval.failures import CLASSES
    from pipelines.eval.report import failure_lines, real_schema_line

    def m(ex: float, **wrong: int) -> dict:
        return {**_m(ex), "failures": {c: wrong.get(c, 0) for c in CLASSES}}

    metrics = {
        "n_examples": 120,
        "base": m(0.0, not_executable=120),
        "tuned": m(0.4, wrong_table=50, missing_condition=22),
        "real_schema": {
            "domains": ["GeoNuclearData", "StudentMathScore"],
            "n_examples": 59,
            "base": m(0.0),
            "tuned": m(0.051, missing_condition=20, join_path=11, wrong_column=25),
        },
    }
    assert real_schema_line(metrics) == (
        "real-schema set (GeoNuclearData, StudentMathScore; 59 examples): execution accuracy "
        "base 0.0%, tuned 5.1%, valid SQL 100.0%"
    )
    assert failure_lines(metrics) == [
        "eval: wrong table 50, missing condition 22",
        "real_schema: wrong column 25, missing condition 20, join path 11",
    ]
    assert real_schema_line({"n_examples": 1}) is None
