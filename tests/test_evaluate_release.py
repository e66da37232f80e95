"""Stage tests on a tiny model: evaluate writes the contract; release registers, gates,
promotes and rolls back; a registered version loads back and reproduces the predictions."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import mlflow
from pipelines.config import EvaluateConfig, TrainConfig, load_params
from pipelines.data.records import read_jsonl
from pipelines.eval import evaluate
from pipelines.model import train
from pipelines.model.base import load_base
from pipelines.model.generate import generate_sql
from pipelines.model.prompt import build_prompt
from pipelines.release import registry

pytestmark = pytest.mark.slow
TRAIN = TrainConfig(
    lora_r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    target_modules="all-linear",
    learning_rate=1e-3,
    weight_decay=0.0,
    warmup_ratio=0.1,
    batch_size=4,
    grad_accum=1,
    max_steps=2,
    max_length=512,
    precision="fp32",
    log_every=1,
    checkpoint_every=100,
)


def _params(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg, name="adapter"):
    p = load_params()
    paths = p.paths.model_copy(
        update={
            "base_model": tiny_base_dir,
            "prepared": prepared_dir,
            "adapter": tmp_path / name,
            "checkpoints": tmp_path / "ckpt",
            "eval_metrics": tmp_path / f"{name}-eval.json",
            "predictions": tmp_path / "predictions.jsonl",
            "judge_cache": tmp_path / "judge.sqlite",
        }
    )
    evaluate_cfg = p.evaluate.model_copy(update={"max_new_tokens": 8, "batch_size": 4})
    return p.model_copy(update={"paths": paths, "mlflow": mlflow_cfg, "evaluate": evaluate_cfg})


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


def _fake_eval(p, base_ex, tuned_ex):
    def m(ex):
        return {
            "execution_accuracy": ex,
            "exact_match": 0.0,
            "valid_sql_rate": 1.0,
            "judge_accuracy": None,
        }

    p.path("eval_metrics").write_text(
        json.dumps({"n_examples": 10, "base": m(base_ex), "tuned": m(tuned_ex)})
    )


def test_evaluate_writes_the_output_contract(
    tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg, monkeypatch
):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    p = _params(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg)
    info = _train(p)
    cfg: EvaluateConfig = p.evaluate
    metrics, rows = evaluate.run(
        cfg, 0, tiny_base_dir, p.path("adapter"), prepared_dir, p.path("judge_cache")
    )
    assert metrics["n_examples"] == 10 and len(rows) == 20
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
    p.path("eval_metrics").write_text(json.dumps(metrics))
    evaluate.log_to_mlflow(info["run_id"], metrics, rows, p.path("eval_metrics"))
    run = mlflow.get_run(info["run_id"])
    assert "tuned_execution_accuracy" in run.data.metrics
    table = mlflow.load_table("eval/predictions.json", run_ids=[info["run_id"]])
    assert len(table) == 20 and {"gold_sql", "pred_sql", "execution_match"} <= set(table.columns)


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
    _fake_eval(p1, base_ex=0.1, tuned_ex=0.5)
    r1 = registry.release(p1)
    assert (r1.version, r1.champion, r1.decision.promote, r1.reused) == (1, 1, True, False)

    again = registry.release(p1)  # same adapter: no new version
    assert again.reused and again.version == 1 and again.champion == 1

    p2 = _params(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg, "a2")
    _train(p2, seed=1)
    _fake_eval(p2, base_ex=0.1, tuned_ex=0.4)  # worse than the champion: stays challenger
    r2 = registry.release(p2)
    assert (r2.version, r2.champion, r2.decision.promote) == (2, 1, False)

    p3 = _params(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg, "a3")
    _train(p3, seed=2)
    _fake_eval(p3, base_ex=0.1, tuned_ex=0.7)
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
