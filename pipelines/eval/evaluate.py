"""The `evaluate` stage: base vs fine-tuned model on the held-out eval split.

For each model: batched greedy generation, then every predicted query is guarded and executed
read-only against the example's database and compared with the gold result (execution
accuracy), normalised and compared as text (exact match), and, when an OpenAI-compatible
endpoint is configured, judged by an LLM. Writes `metrics/eval.json` (DVC metrics, output
contract in DESIGN.md) and a predictions file, and logs both into the training's MLflow run.

Run: `python -m pipelines.eval.evaluate` (dvc stage `evaluate`).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pandas as pd

import mlflow
from pipelines import sql as sqlmod
from pipelines.config import EvaluateConfig, load_params, setup_entry_point
from pipelines.data.records import read_jsonl, write_jsonl
from pipelines.eval.judge import JudgeItem, JudgeReport, judge
from pipelines.eval.metrics import score_example, summarize
from pipelines.model.base import load_base
from pipelines.model.generate import generate_sql
from pipelines.model.prompt import build_prompt
from pipelines.tracking import configure_mlflow

log = logging.getLogger(__name__)


def sample_eval(records: list[dict], max_examples: int, seed: int) -> list[dict]:
    """A deterministic sample (all records when `max_examples` is 0 or larger than the set)."""
    if not max_examples or max_examples >= len(records):
        return records
    picked = random.Random(seed).sample(range(len(records)), max_examples)
    return [records[i] for i in sorted(picked)]


def evaluate_model(
    model,
    tok,
    records: list[dict],
    gold: list[sqlmod.ExecResult],
    db_dir: Path,
    cfg: EvaluateConfig,
) -> tuple[list[dict], float]:
    """Scored prediction rows for one model, and its generation speed (tokens/s)."""
    prompts = [build_prompt(r["ddl"], r["question"], tok) for r in records]
    gen = generate_sql(model, tok, prompts, cfg.batch_size, cfg.max_new_tokens)
    rows = []
    for r, g, text, pred_sql in zip(records, gold, gen.texts, gen.sql, strict=True):
        pred = sqlmod.execute(db_dir / f"{r['db_id']}.sqlite", pred_sql, cfg.sql_timeout_s)
        rows.append(
            {
                "id": r["id"],
                "db_id": r["db_id"],
                "domain": r["domain"],
                "lang": r["lang"],
                "difficulty": r["difficulty"],
                "question": r["question"],
                "gold_sql": r["sql"],
                "pred_sql": pred_sql,
                "raw_output": text,
                **score_example(r["sql"], g, pred_sql, pred, cfg.float_tolerance),
            }
        )
    return rows, gen.tokens_per_s


def apply_judge(
    rows: list[dict], records: list[dict], cfg: EvaluateConfig, cache: Path
) -> JudgeReport:
    """Adds `judge` (True/False/None) to each row; the report says whether it ran."""
    ddl = {r["id"]: r["ddl"] for r in records}
    items = [
        JudgeItem(
            f"{row['model']}:{row['id']}",
            ddl[row["id"]],
            row["question"],
            row["gold_sql"],
            row["pred_sql"],
        )
        for row in rows
    ]
    report = judge(items, cfg.judge, cache)
    for row, item in zip(rows, items, strict=True):
        row["judge"] = report.verdicts.get(item.id)
        if item.id in report.errors:
            row["judge_error"] = report.errors[item.id]
    return report


def run(
    cfg: EvaluateConfig,
    seed: int,
    base_dir: Path,
    adapter_dir: Path,
    prepared_dir: Path,
    judge_cache: Path,
) -> tuple[dict, list[dict]]:
    """(metrics in the eval.json shape, prediction rows of both models)."""
    records = sample_eval(read_jsonl(prepared_dir / "eval.jsonl"), cfg.max_examples, seed)
    db_dir = prepared_dir / "databases"
    gold = [
        sqlmod.execute(db_dir / f"{r['db_id']}.sqlite", r["sql"], cfg.sql_timeout_s)
        for r in records
    ]
    broken = [r["id"] for r, g in zip(records, gold, strict=True) if not g.ok]
    if broken:
        raise ValueError(f"gold SQL fails to execute for {len(broken)} examples, e.g. {broken[:5]}")

    all_rows, speed = [], {}
    for name, adapter in (("base", None), ("tuned", adapter_dir)):
        model, tok = load_base(base_dir, adapter)
        rows, speed[name] = evaluate_model(model, tok, records, gold, db_dir, cfg)
        all_rows += [{"model": name, **row} for row in rows]
        del model
    report = apply_judge(all_rows, records, cfg, judge_cache)
    metrics = {
        "n_examples": len(records),
        "judge": {
            "status": report.status,
            "model": report.model,
            "calls": report.calls,
            "cost_usd": report.cost_usd,
            "errors": len(report.errors),
        },
    }
    for name in ("base", "tuned"):
        rows = [r for r in all_rows if r["model"] == name]
        metrics[name] = summarize(rows, cfg.bootstrap_samples, seed, speed[name])
    return metrics, all_rows


def log_to_mlflow(run_id: str, metrics: dict, rows: list[dict], metrics_path: Path) -> None:
    """Eval figures, the eval.json file and a predictions table into the training's run."""
    with mlflow.start_run(run_id=run_id):
        flat = {"eval_n_examples": metrics["n_examples"]}
        for name in ("base", "tuned"):
            m = metrics[name]
            for key in (
                "execution_accuracy",
                "execution_accuracy_nonempty",
                "exact_match",
                "valid_sql_rate",
                "judge_accuracy",
                "judge_execution_kappa",
                "generation_tokens_per_s",
            ):
                if m[key] is not None:
                    flat[f"{name}_{key}"] = m[key]
        mlflow.log_metrics(flat)
        mlflow.log_artifact(str(metrics_path), artifact_path="eval")
        columns = [
            "model",
            "id",
            "domain",
            "lang",
            "difficulty",
            "question",
            "gold_sql",
            "pred_sql",
            "valid",
            "execution_match",
            "exact_match",
            "judge",
        ]
        mlflow.log_table(pd.DataFrame(rows)[columns], artifact_file="eval/predictions.json")


def main() -> None:
    setup_entry_point()
    p = load_params()
    adapter = p.path("adapter")
    metrics, rows = run(
        p.evaluate, p.seed, p.path("base_model"), adapter, p.path("prepared"), p.path("judge_cache")
    )
    out = p.path("eval_metrics")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    write_jsonl(p.path("predictions"), rows)
    train_info = json.loads((adapter / "train_info.json").read_text())
    configure_mlflow(p.mlflow)
    log_to_mlflow(train_info["run_id"], metrics, rows, out)
    b, t = metrics["base"], metrics["tuned"]
    log.info(
        "execution accuracy on %d held-out examples: base %.1f%% -> tuned %.1f%% (judge: %s)",
        metrics["n_examples"],
        100 * b["execution_accuracy"],
        100 * t["execution_accuracy"],
        metrics["judge"]["status"],
    )


if __name__ == "__main__":
    main()
