"""The `validate` stage: the 20-row fixture passes; each corruption breaks its rule and only it."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipelines.config import load_params
from pipelines.data import validate
from pipelines.data.records import FIELDS, read_jsonl, write_jsonl
from pipelines.db_schema import schema_of
from pipelines.sql import missing_refs, parse

# params.yaml's rules, with limits the fixture's questions and the endless query hit quickly.
CFG = load_params().validate_.model_copy(update={"max_question_chars": 80, "sql_timeout_s": 0.5})
# A recursive CTE that never ends: stopped by the time limit (and its name is no missing table).
ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT MAX(x) FROM c"


def _corrupt(prepared: Path, split: str, i: int, /, **changes: object) -> None:
    path = prepared / f"{split}.jsonl"
    rows = read_jsonl(path)
    rows[i].update(changes)
    write_jsonl(path, rows)


def _set(**changes: object) -> Callable[[Path], None]:
    return lambda prepared: _corrupt(prepared, "train", 1, **changes)


def _copy_question(prepared: Path, split: str) -> None:
    """Give the game (eval) example 0, or shop (train) example 2, the question of shop example 0
    written differently: a leak into eval, or a duplicate within the train database."""
    q = read_jsonl(prepared / "train.jsonl")[0]["question"].upper().rstrip(".")
    _corrupt(prepared, split, 0 if split == "eval" else 2, question=f"  {q}!")


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    **{f"{f}_present": _set(**{f: None if f != "question" else "   "}) for f in FIELDS},
    "id_unique": _set(id="shop-0"),
    "question_length": _set(question="hi?"),
    "lang_allowed": _set(lang="fr"),
    "difficulty_allowed": _set(difficulty="trivial"),
    "split_allowed": _set(split="test"),
    "db_exists": _set(db_id="nowhere"),
    "db_id_safe": _set(db_id="../../cache/judge"),
    "sql_parses": _set(sql="SELECT name FROM WHERE ("),
    "sql_read_only": _set(sql="DELETE FROM customers"),
    # SQLite reads an unknown double-quoted column as a string and runs it: refs catch it.
    "sql_refs_exist": _set(sql='SELECT "nickname" FROM customers'),
    "sql_reads_table": _set(sql="SELECT 42 FROM customers"),
    "sql_executes": _set(sql="SELECT no_such_function(name) FROM customers"),
    "not_duplicate": lambda prepared: _copy_question(prepared, "train"),
    "no_leakage": lambda prepared: _copy_question(prepared, "eval"),
    "splits_not_empty": lambda prepared: _move_eval_to_train(prepared),
}


def _move_eval_to_train(prepared: Path) -> None:
    rows = read_jsonl(prepared / "train.jsonl") + [
        {**r, "split": "train"} for r in read_jsonl(prepared / "eval.jsonl")
    ]
    write_jsonl(prepared / "train.jsonl", rows)
    write_jsonl(prepared / "eval.jsonl", [])


def _failed(result: validate.ValidationResult) -> dict[str, validate.RuleResult]:
    return {r.rule: r for r in result.failed}


@pytest.mark.slow
def test_valid_data_passes(prepared_dir: Path, tmp_path: Path) -> None:
    report = tmp_path / "report"
    result = validate.run(CFG, prepared_dir, report)

    assert result.success and result.n_rows == 20 and not result.failed
    assert {r.rule for r in result.rules} == set(CORRUPTIONS)  # every rule has a test below
    summary = json.loads((report / "summary.json").read_text())
    assert summary["success"] and summary["n_by_split"] == {"train": 10, "eval": 10}
    assert result.data_docs is not None and result.data_docs.is_file()
    assert report / summary["data_docs"] == result.data_docs


@pytest.mark.slow
@pytest.mark.parametrize("rule", list(CORRUPTIONS))
def test_each_rule_catches_its_corruption(rule: str, prepared_dir: Path, tmp_path: Path) -> None:
    CORRUPTIONS[rule](prepared_dir)
    report = tmp_path / "report"
    with pytest.raises(validate.DataValidationError) as err:
        validate.run(CFG, prepared_dir, report)

    failed = _failed(err.value.result)
    assert list(failed) == [rule]
    message = str(err.value)
    assert f"- {rule} (" in message
    if rule == "splits_not_empty":  # a whole-table rule: no failing rows, an observed value
        assert failed[rule].observed == {"partial_missing_list": ["eval"]}
        assert "['eval']" in message
    else:
        # GX counts every row sharing a duplicated id; the computed checks flag only the copies.
        assert failed[rule].unexpected_count == (2 if rule == "id_unique" else 1)
        # The message names the count and the example row (id, question, SQL).
        example = failed[rule].examples[0]
        assert set(example) >= {"id", "question", "sql"}
        assert f"{failed[rule].unexpected_count} row(s)" in message
        assert f"id={example['id']!r}" in message and repr(example["sql"]) in message
    summary = json.loads((report / "summary.json").read_text())
    assert [r["rule"] for r in summary["rules"] if not r["success"]] == [rule]
    assert err.value.result.data_docs.is_file()


def test_sql_checks_say_why(prepared_dir: Path) -> None:
    """The computed columns alone (no GX): details for timeouts and missing references."""
    rows = read_jsonl(prepared_dir / "train.jsonl")[:3]
    rows[0]["sql"] = ENDLESS
    rows[1]["sql"] = "SELECT c.nickname FROM customers AS c JOIN ghosts g ON g.id = c.customer_id"
    df = validate.check_records(rows, prepared_dir / "databases", timeout_s=0.2)

    assert df["sql_refs_exist"].tolist() == [True, False, True]
    assert df["sql_executes"].tolist() == [False, False, True]
    assert df.loc[0, "sql_executes_why"] == "timeout"
    assert df.loc[1, "sql_refs_exist_why"] == (
        "not in the database: table ghosts, column c.nickname"
    )


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT c.name AS n, COUNT(*) AS k FROM customers c GROUP BY n ORDER BY k DESC",
        "WITH big AS (SELECT customer_id, amount AS a FROM orders WHERE amount > 10) "
        "SELECT big.a, customers.name FROM big JOIN customers USING (customer_id)",
        "SELECT t.total FROM (SELECT SUM(amount) AS total FROM orders) AS t",
        "SELECT name FROM customers WHERE EXISTS (SELECT 1 FROM orders o "
        "WHERE o.customer_id = customers.customer_id)",
        "SELECT o.* , rowid FROM orders o",
        "SELECT name FROM customers UNION SELECT city FROM customers ORDER BY 1",
    ],
)
def test_refs_accept_aliases_ctes_and_subqueries(prepared_dir: Path, sql: str) -> None:
    schema = schema_of(prepared_dir / "databases" / "shop.sqlite")
    assert missing_refs(parse(sql), schema) == []


@pytest.mark.slow
def test_main_exits_nonzero_and_logs_the_failures(
    prepared_dir: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    """`dvc repro` stops on bad data: the stage's exit status is non-zero."""
    CORRUPTIONS["sql_read_only"](prepared_dir)
    paths = {"prepared": prepared_dir, "validation": tmp_path / "report"}
    params = SimpleNamespace(validate_=CFG, path=paths.__getitem__)
    monkeypatch.setattr(validate, "load_params", lambda: params)
    monkeypatch.setattr(validate, "setup_entry_point", lambda: None)
    with caplog.at_level(logging.ERROR, logger="pipelines"), pytest.raises(SystemExit) as exit_:
        validate.main()
    assert exit_.value.code == 1
    assert "sql_read_only" in caplog.text and "DELETE FROM customers" in caplog.text
    assert (tmp_path / "report" / "summary.json").is_file()
