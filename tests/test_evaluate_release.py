"""Stage tests on a tiny model: evaluate writes the contract; release registers, gates,
promotes and rolls back; a registered version loads back and reproduces the predictions."""

from __future__ import annotations

import csv
import json

import pandas as pd
import pytest

import mlflow
from pipelines.config import EvaluateConfig, TrainConfig, load_params
from pipelines.data.records import read_jsonl, write_jsonl
from pipelines.eval import evaluate, external
from pipelines.eval.failures import CLASSES
from pipelines.eval.report import ReportPaths, write_report
from pipelines.model import train
from pipelines.model.base import load_base
from pipelines.model.decoding import GREEDY
from pipelines.model.generate import generate_sql
from pipelines.model.prompt import build_prompt
from pipelines.release import registry
from pipelines.vllm_runtime import VLLMRuntime
from tests.test_train import CFG as TRAIN_CFG

pytestmark = pytest.mark.slow
# The unit tests' tiny training config, shortened: two steps, no dev split, no checkpoints.
TRAIN = TrainConfig(
    **{**TRAIN_CFG, "max_steps": 2, "checkpoint_every": 100, "dev_examples": 0, "eval_every": 100}
)


def _params(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg, name="adapter"):
    p = load_params()
    paths = p.paths.model_copy(
        update={
            "base_model": tiny_base_dir,
            "base_models": tmp_path / "bases",
            "prepared": prepared_dir,
            "adapter": tmp_path / name,
            "checkpoints": tmp_path / "ckpt",
            "eval_metrics": tmp_path / f"{name}-eval.json",
            "predictions": tmp_path / "predictions.jsonl",
            "judge_cache": tmp_path / "judge.sqlite",
            "merged_models": tmp_path / "merged",
            "run_dir": tmp_path / "run",
        }
    )
    # transformers, greedy without a grammar: these tests compare predictions with
    # `generate_sql` token for token.
    evaluate_cfg = p.evaluate.model_copy(
        update={"max_new_tokens": 8, "batch_size": 4, "backend": "transformers"}
    )
    update = {"paths": paths, "mlflow": mlflow_cfg, "evaluate": evaluate_cfg, "decoding": GREEDY}
    return p.model_copy(update=update)


def _train(p, seed=0):
    return train.run(
        TRAIN,
        seed,
        p.path("base_model"),
        p.path("prepared"),
        p.path("adapter"),
        p.path("checkpoints"),
        p.mlflow,
    )


def _fake_eval(p, base_ex, tuned_ex, real_schema=None):
    """eval.json with these execution accuracies; `real_schema`: (base, tuned) on that set."""

    def m(ex):
        return {
            "execution_accuracy": ex,
            "exact_match": 0.0,
            "valid_sql_rate": 1.0,
            "judge_accuracy": None,
        }

    metrics = {"n_examples": 10, "base": m(base_ex), "tuned": m(tuned_ex)}
    if real_schema:
        real = {"base": m(real_schema[0]), "tuned": m(real_schema[1])}
        metrics["real_schema"] = {"domains": ["x"], "n_examples": 59, **real}
    p.path("eval_metrics").write_text(json.dumps(metrics))


def test_evaluate_writes_the_output_contract(
    tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg, monkeypatch
):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    p = _params(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg)
    info = _train(p)
    cfg: EvaluateConfig = p.evaluate
    metrics, rows = evaluate.run(
        cfg,
        0,
        tiny_base_dir,
        p.path("adapter"),
        prepared_dir,
        p.path("judge_cache"),
        VLLMRuntime.of(p),
        GREEDY,
    )
    assert metrics["n_examples"] == 10 and len(rows) == 20
    assert "selection" not in metrics  # the fixture has no selection split
    assert metrics["judge"]["status"] == "skipped" and metrics["judge"]["calls"] == 0
    for name in ("base", "tuned"):
        m = metrics[name]
        for key in (
            "execution_accuracy",
            "execution_accuracy_nonempty",
            "exact_match",
            "valid_sql_rate",
        ):
            assert 0.0 <= m[key] <= 1.0
        assert m["by_domain"]["game"]["n"] == 10 and m["judge_accuracy"] is None
        assert set(m["by_difficulty"]) <= {"easy", "medium", "hard", "extra"}
        assert m["generation_tokens_per_s"] > 0
    paths = ReportPaths.under(tmp_path / "report")
    write_report(paths, metrics, rows)
    assert json.loads(paths.metrics.read_text()) == metrics
    assert len(read_jsonl(paths.predictions)) == 20
    with paths.breakdown.open() as f:
        bars = list(csv.DictReader(f))
    assert {(b["model"], b["group"]) for b in bars} >= {
        ("base", "domain: game"),
        ("tuned", "lang: ko"),
    }
    assert "judge was skipped" in paths.disagreements.read_text()
    evaluate.log_to_mlflow(info["run_id"], metrics, rows, paths)
    run = mlflow.get_run(info["run_id"])
    assert "tuned_execution_accuracy" in run.data.metrics
    assert run.data.metrics["judge_calls"] == 0
    table = mlflow.load_table("eval/predictions.json", run_ids=[info["run_id"]])
    assert len(table) == 20 and {"gold_sql", "pred_sql", "execution_match"} <= set(table.columns)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(info["run_id"], "eval")}
    assert {"eval/breakdown.csv", "eval/disagreements.md", "eval/eval.json"} <= artifacts


def test_evaluate_scores_the_selection_and_real_schema_splits(
    tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg, monkeypatch
):
    """A prepared selection split (data.selection_domains) is scored for the tuned model only
    and the real-schema split (data.real_schema) for both, beside the reported figures, in the
    same generations; their rows are labelled by dataset and carry failure classes; eval.json,
    the breakdown and MLflow show them, the reported figures stay those of `eval`."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    held_out = read_jsonl(prepared_dir / "eval.jsonl")[:4]
    write_jsonl(prepared_dir / "selection.jsonl", [r | {"split": "selection"} for r in held_out])
    real = [r | {"split": "real_schema"} for r in read_jsonl(prepared_dir / "train.jsonl")[:3]]
    write_jsonl(prepared_dir / "real_schema.jsonl", real)
    p = _params(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg)
    info = _train(p)
    asked = []  # prompts per generation: each model answers its splits in one (one start-up)
    real_generate = evaluate.generate
    monkeypatch.setattr(
        evaluate, "generate", lambda spec, tok, prompts, *a: asked.append(len(prompts))
        or real_generate(spec, tok, prompts, *a),
    )  # fmt: skip
    metrics, rows = evaluate.run(
        p.evaluate, 0, tiny_base_dir, p.path("adapter"), prepared_dir, p.path("judge_cache"),
        VLLMRuntime.of(p), GREEDY,
    )  # fmt: skip
    n = metrics["n_examples"]
    assert asked == [n + 3, n + 4 + 3]
    picked = metrics["selection"]
    assert picked["domains"] == ["game"] and picked["n_examples"] == 4
    assert set(picked) == {"domains", "n_examples", "tuned"}
    assert 0.0 <= picked["tuned"]["execution_accuracy"] <= 1.0
    assert set(metrics["real_schema"]) == {"domains", "n_examples", "base", "tuned"}
    assert metrics["real_schema"]["n_examples"] == 3
    by_dataset = {
        d: [r for r in rows if r["dataset"] == d] for d in ("eval", "selection", "real_schema")
    }
    assert [len(v) for v in by_dataset.values()] == [2 * n, 4, 2 * 3]
    for r in rows:  # a failure class for each wrong answer, none for a right one
        assert (r["failure"] is None) == r["execution_match"], r
    for name in ("base", "tuned"):  # the M blocks count exactly their own rows' failures
        mine = [r for r in by_dataset["real_schema"] if r["model"] == name]
        assert sum(metrics["real_schema"][name]["failures"].values()) == sum(
            not r["execution_match"] for r in mine
        )
        assert metrics[name]["by_domain"].keys() == {"game"}  # eval's figures: eval rows only

    paths = ReportPaths.under(tmp_path / "report")
    write_report(paths, metrics, rows)
    assert json.loads(paths.metrics.read_text())["real_schema"] == metrics["real_schema"]
    with paths.breakdown.open() as f:
        bars = list(csv.DictReader(f))
    assert {("base", "real_schema overall: all"), ("tuned", "selection overall: all")} <= {
        (b["model"], b["group"]) for b in bars
    }
    evaluate.log_to_mlflow(info["run_id"], metrics, rows, paths)
    logged = mlflow.get_run(info["run_id"]).data.metrics
    assert (
        logged["real_schema_tuned_execution_accuracy"]
        == (metrics["real_schema"]["tuned"]["execution_accuracy"])
    )
    assert "real_schema_base_failures_missing_condition" in logged
    assert "selection_tuned_valid_sql_rate" in logged and "tuned_failures_wrong_table" in logged


def test_gold_queries_score_perfectly(tiny_base_dir, prepared_dir):
    """The scorer itself: feeding the gold SQL back as predictions gives 100%."""
    from pipelines import sql as sqlmod
    from pipelines.eval.metrics import score_example

    for r in read_jsonl(prepared_dir / "eval.jsonl"):
        db = prepared_dir / "databases" / f"{r['db_id']}.sqlite"
        gold = sqlmod.execute(db, r["sql"], 1.0)
        row = score_example(r["sql"], gold, r["sql"], sqlmod.execute(db, r["sql"], 1.0), 1e-6)
        assert row["valid"] and row["execution_match"] and row["exact_match"], r


def test_release_gate_promotion_rollback_and_reload(
    tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg
):
    p1 = _params(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg, "a1")
    _train(p1, seed=0)
    _fake_eval(p1, base_ex=0.1, tuned_ex=0.5, real_schema=(0.0, 0.2))
    r1 = registry.release(p1)
    assert (r1.version, r1.champion, r1.decision.promote, r1.reused) == (1, 1, True, False)

    again = registry.release(p1)  # same adapter: no new version
    assert again.reused and again.version == 1 and again.champion == 1

    p2 = _params(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg, "a2")
    _train(p2, seed=1)
    # better than the champion on `eval`, 15 points worse on the real-schema set: stays challenger
    _fake_eval(p2, base_ex=0.1, tuned_ex=0.6, real_schema=(0.0, 0.05))
    r2 = registry.release(p2)
    assert (r2.version, r2.champion, r2.decision.promote) == (2, 1, False)
    assert [r for r in r2.decision.reasons if "drops beyond" in r] == [
        "real-schema set: execution accuracy 0.050 vs champion 0.200 (drops beyond tolerance 0.05)"
    ]

    p3 = _params(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg, "a3")
    _train(p3, seed=2)
    _fake_eval(p3, base_ex=0.1, tuned_ex=0.7, real_schema=(0.0, 0.2))
    assert registry.release(p3).champion == 3

    client = mlflow.MlflowClient()
    mv = client.get_model_version_by_alias("text2sql", "champion")
    assert int(mv.version) == 3
    assert {"git_commit", "data_hash", "base_model", "base_model_hash"} <= set(mv.tags)
    assert mv.tags["eval_execution_accuracy"] == "0.7000"
    assert registry.rollback(p3) == (3, 1)
    assert int(client.get_model_version_by_alias("text2sql", "champion").version) == 1
    with pytest.raises(ValueError, match="no earlier champion"):
        registry.rollback(p3)
    assert registry.rollback(p3, to=3) == (1, 3)

    # The champion loads through the standard MLflow API and reproduces direct generation.
    records = read_jsonl(prepared_dir / "eval.jsonl")[:3]
    loaded = mlflow.pyfunc.load_model("models:/text2sql@champion")
    got = loaded.predict(
        pd.DataFrame(
            {"question": [r["question"] for r in records], "ddl": [r["ddl"] for r in records]}
        )
    )
    model, tok = load_base(tiny_base_dir, p3.path("adapter"))
    prompts = [build_prompt(r["ddl"], r["question"], tok) for r in records]
    assert list(got) == generate_sql(model, tok, prompts, 4, 8).sql


def test_lora_rank_experiment_table(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg):
    from pipelines.bench import experiment

    p = _params(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg)
    p = p.model_copy(update={"train": TRAIN.model_copy(update={"dev_examples": 1})})
    variants = experiment.lora_rank_variants([2, 4])
    p = p.replace(paths={"experiments": tmp_path / "exp"})
    md = experiment.run(p, "lora_rank", variants, steps=2)
    rows = json.loads((tmp_path / "exp" / "lora_rank.json").read_text())
    assert [r["lora_r"] for r in rows] == [2, 4] and all(r["steps"] == 2 for r in rows)
    assert all(0 <= r["execution_accuracy"] <= 1 and r["eval_loss"] > 0 for r in rows)
    assert all(r["heldout_loss"] > 0 for r in rows)
    assert rows[0]["heldout_loss"] != rows[1]["heldout_loss"]  # each variant's own adapter
    assert md.read_text().count("\n| ") == 4  # header, rule, one line per rank
    run = mlflow.get_run(rows[0]["run_id"])
    assert run.data.tags["experiment"] == "lora_rank" and run.data.params["lora_r"] == "2"


def _spider_dir(root):
    """A Spider-format folder (dev.json + database/<db>/<db>.sqlite) with the fixture's game
    questions, plus one example whose gold SQL does not execute."""
    from tests.conftest import GAME_DDL, GAME_QA, GAME_ROWS, make_db

    make_db(root / "database" / "arcade" / "arcade.sqlite", GAME_DDL, GAME_ROWS)
    dev = [{"db_id": "arcade", "question": q, "query": sql} for q, sql, _, _ in GAME_QA]
    dev.append({"db_id": "arcade", "question": "Broken gold?", "query": "SELECT nope FROM nowhere"})
    (root / "dev.json").write_text(json.dumps(dev))
    return root


def test_sqlops_eval_scores_registered_and_base_models_on_a_spider_dir(
    tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg, monkeypatch
):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    p = _params(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg)
    _train(p)
    _fake_eval(p, base_ex=0.1, tuned_ex=0.5)
    registry.release(p)
    spider = _spider_dir(tmp_path / "spider")
    out = tmp_path / "report"
    specs = ["models:/text2sql@champion", "base"]
    metrics = external.run(p, f"spider:{spider}", specs, out, max_examples=0)

    assert metrics["n_examples"] == 10 and metrics["dataset"]["gold_errors"] == 1
    assert list(metrics["models"]) == ["text2sql-champion", "base"]
    assert metrics["models"]["text2sql-champion"]["version"] == 1
    for label in metrics["models"]:
        m = metrics[label]
        assert 0 <= m["execution_accuracy"] <= 1 and m["by_domain"]["arcade"]["n"] == 10
        assert m["generation_tokens_per_s"] > 0
    rows = read_jsonl(out / "predictions.jsonl")
    assert len(rows) == 20 and {r["model"] for r in rows} == {"text2sql-champion", "base"}
    assert all(r["id"].startswith("spider-dev-") for r in rows)
    assert json.loads((out / "eval.json").read_text())["n_examples"] == 10
    assert (out / "breakdown.csv").is_file() and (out / "databases" / "arcade.sqlite").is_file()
    # The registered version generates what its adapter on the base model generates.
    records = external.load_dataset(f"spider:{spider}", 0, p.seed, tmp_path / "dbs", p.data)[:10]
    model, tok = load_base(tiny_base_dir, p.path("adapter"))
    prompts = [build_prompt(r["ddl"], r["question"], tok) for r in records]
    expected = generate_sql(model, tok, prompts, 4, 8).sql
    champion_rows = [r for r in rows if r["model"] == "text2sql-champion"]
    assert [r["pred_sql"] for r in champion_rows] == expected
    run = mlflow.search_runs(
        filter_string="tags.eval_dataset LIKE 'spider:%'", output_format="list"
    )
    assert len(run) == 1 and "text2sql-champion_execution_accuracy" in run[0].data.metrics

    with pytest.raises(ValueError, match="spider:<dir>"):
        external.run(p, f"bird:{spider}", ["base"], out)
    with pytest.raises(ValueError, match="no such registered model"):
        external.run(p, f"spider:{spider}", ["models:/text2sql@nobody"], out)


def test_sqlops_eval_cli_with_the_base_model(
    tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg, monkeypatch, capsys
):
    from flows import cli

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    p = _params(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg)
    monkeypatch.setattr(cli, "load_params", lambda: p)
    spider = _spider_dir(tmp_path / "spider")
    out = tmp_path / "out"
    argv = ["eval", "--dataset", f"spider:{spider}", "--model", "base", "--max-examples", "3"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "eval.json").read_text())
    n = metrics["n_examples"]
    assert n + metrics["dataset"]["gold_errors"] == 3  # a seeded sample of 3, broken gold left out
    assert f"{n} examples, judge skipped" in printed and f"report: {out}" in printed
    assert metrics["base"]["by_domain"]["arcade"]["n"] == n
    # every wrong answer classified: in eval.json, the predictions and the printed report
    wrong = [r for r in read_jsonl(out / "predictions.jsonl") if not r["execution_match"]]
    assert all(r["failure"] in CLASSES for r in wrong)
    assert sum(metrics["base"]["failures"].values()) == len(wrong)
    assert "wrong answers by failure class:" in printed
    assert cli.main(["eval", "--dataset", "spider:/nonexistent", "--model", "base"]) == 1
