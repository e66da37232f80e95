"""The `evaluate` stage: base vs fine-tuned model on the held-out eval split.

For each model: generation through `pipelines.model.backends` (offline vLLM on the merged
weights or transformers; `evaluate.backend`) with the gateway's decoding (params.yaml
`decoding:`, `pipelines.model.decoding`: candidates, grammar, choice by execution), then every
predicted query is guarded and executed read-only against the example's database and compared
with the gold result (execution accuracy), normalised and compared as text (exact match), and,
when an OpenAI-compatible endpoint is configured, judged by an LLM (every example, or with
`evaluate.judge.only_execution_failures` only those execution marks wrong). Writes the report
(`pipelines.eval.report`: metrics/eval.json, predictions, the breakdown for DVC plots, the
judge-vs-execution disagreements) and logs it into the training's MLflow run.
`evaluate_models` is the scoring loop `sqlops eval` reuses for registered models and benchmarks.

Run: `python -m pipelines.eval.evaluate` (dvc stage `evaluate`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pandas as pd

import mlflow
from pipelines import sql as sqlmod
from pipelines.config import (
    DecodingConfig,
    EvaluateConfig,
    Params,
    load_params,
    setup_entry_point,
)
from pipelines.data.records import read_jsonl, sample_records, write_jsonl
from pipelines.eval.judge import JudgeItem, JudgeReport, judge
from pipelines.eval.metrics import disagreements, score_example, summarize
from pipelines.eval.report import ReportPaths, model_names, write_report
from pipelines.model.backends import ModelSpec, generate, load_tokenizer
from pipelines.model.decoding import choose, grammar_for
from pipelines.model.generate import Generation
from pipelines.model.prompt import build_prompt
from pipelines.tracking import configure_mlflow
from pipelines.vllm_runtime import VLLMRuntime

log = logging.getLogger(__name__)


def evaluate_model(
    spec: ModelSpec,
    records: list[dict],
    gold: list[sqlmod.ExecResult],
    db_dir: Path,
    cfg: EvaluateConfig,
    vllm: VLLMRuntime,
    decoding: DecodingConfig,
) -> tuple[list[dict], Generation]:
    """Scored prediction rows for one model, and its generation (speed, start-up, backend)."""
    tok = load_tokenizer(spec.base_dir)
    prompts = [build_prompt(r["ddl"], r["question"], tok) for r in records]
    dbs = [db_dir / f"{r['db_id']}.sqlite" for r in records]
    grammars = [grammar_for(db, decoding) for db in dbs]
    gen = generate(spec, tok, prompts, cfg, vllm, decoding, grammars)
    rows = []
    for r, g, db, cands in zip(records, gold, dbs, gen.candidates, strict=True):
        choice = choose(cands, db, decoding, cfg.sql_timeout_s)
        pred_sql, text = choice.sql, choice.text
        pred = sqlmod.execute(db, pred_sql, cfg.sql_timeout_s)
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
                "n_candidates": choice.n_candidates,
                "n_executed": choice.n_executed,
                "fallback": choice.fallback,
                **score_example(r["sql"], g, pred_sql, pred, cfg.float_tolerance),
            }
        )
    return rows, gen


def apply_judge(
    rows: list[dict], records: list[dict], cfg: EvaluateConfig, cache: Path
) -> JudgeReport:
    """Adds `judge` (True/False/None) to each row; the report says whether it ran. With
    `only_execution_failures`, rows that execute correctly are not sent (their `judge` is None)."""
    ddl = {r["id"]: r["ddl"] for r in records}
    asked = [r for r in rows if not (cfg.judge.only_execution_failures and r["execution_match"])]
    items = [
        JudgeItem(
            f"{row['model']}:{row['id']}",
            ddl[row["id"]],
            row["question"],
            row["gold_sql"],
            row["pred_sql"],
        )
        for row in asked
    ]
    report = judge(items, cfg.judge, cache)
    for row in rows:
        row["judge"] = None
    for row, item in zip(asked, items, strict=True):
        row["judge"] = report.verdicts.get(item.id)
        if item.id in report.errors:
            row["judge_error"] = report.errors[item.id]
    return report


def gold_results(records: list[dict], db_dir: Path, timeout_s: float) -> list[sqlmod.ExecResult]:
    return [sqlmod.execute(db_dir / f"{r['db_id']}.sqlite", r["sql"], timeout_s) for r in records]


ModelLoader = Callable[[], ModelSpec]  # called when the model's turn comes


def evaluate_models(
    models: dict[str, ModelLoader],
    records: list[dict],
    gold: list[sqlmod.ExecResult],
    db_dir: Path,
    cfg: EvaluateConfig,
    seed: int,
    judge_cache: Path,
    vllm: VLLMRuntime,
    decoding: DecodingConfig,
    predictions: Path | None = None,
    selection: tuple[list[dict], list[sqlmod.ExecResult]] | None = None,
) -> tuple[dict, list[dict]]:
    """Generate, score and judge every model on the same examples; one model in memory at a
    time. Returns (metrics in the eval.json shape, one `M` block per model name; rows).

    `selection` (records, gold results): the model-selection split, which the last model also
    answers in the same generation (one engine start-up, ~4 min for vLLM on a 2-core AVX2 CPU);
    scored apart under `metrics["selection"]`, its rows not among the returned ones.

    With `predictions`, the scored rows of every finished model are written there as soon as
    it finishes (unjudged; the report rewrites the file at the end), so that a later model or
    the judge failing loses only what was not finished."""
    all_rows, speed, picked = [], {}, []
    last = list(models)[-1]
    for name, load in models.items():
        extra, extra_gold = selection if selection and name == last else ([], [])
        rows, gen = evaluate_model(
            load(), records + extra, gold + extra_gold, db_dir, cfg, vllm, decoding
        )
        rows, picked = rows[: len(records)], [{"model": name, **r} for r in rows[len(records) :]]
        speed[name] = gen.tokens_per_s
        all_rows += [{"model": name, **row} for row in rows]
        if predictions is not None:
            predictions.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(predictions, all_rows)
            log.info("%s: %d predictions written to %s", name, len(rows), predictions)
    report = apply_judge(all_rows, records, cfg, judge_cache)
    failures_only = cfg.judge.only_execution_failures
    metrics = {
        "n_examples": len(records),
        "judge": {
            "status": report.status,
            "model": report.model,
            "calls": report.calls,
            "cost_usd": report.cost_usd,
            "errors": len(report.errors),
            "scope": "execution_failures" if failures_only else "all",
            "asked": len(report.verdicts),  # examples put to the judge (cached ones included)
            "cached": report.cached,
            "prompt_tokens": report.prompt_tokens,
            "completion_tokens": report.completion_tokens,
        },
    }
    for name in models:
        rows = [r for r in all_rows if r["model"] == name]
        metrics[name] = summarize(rows, cfg.bootstrap_samples, seed, speed[name], failures_only)
    if picked:
        apply_judge(picked, selection[0], cfg, judge_cache)
        metrics["selection"] = {
            "domains": sorted({r["domain"] for r in selection[0]}),
            "n_examples": len(selection[0]),
            last: summarize(picked, cfg.bootstrap_samples, seed, speed[last], failures_only),
        }
    return metrics, all_rows


def run(
    cfg: EvaluateConfig,
    seed: int,
    base_dir: Path,
    adapter_dir: Path,
    prepared_dir: Path,
    judge_cache: Path,
    vllm: VLLMRuntime,
    decoding: DecodingConfig,
    predictions: Path | None = None,
) -> tuple[dict, list[dict]]:
    """(metrics in the eval.json shape, prediction rows of both models). The tuned model is
    also scored on the selection split (`data.selection_domains`) when there is one: the figure
    knobs are chosen on, under `metrics["selection"]`, its rows not among the returned ones.
    `predictions`: see `evaluate_models`."""
    db_dir = prepared_dir / "databases"
    models = {
        "base": lambda: ModelSpec(base_dir),
        "tuned": lambda: ModelSpec(base_dir, adapter_dir),
    }
    records, gold = split_with_gold(prepared_dir, "eval", cfg, seed)
    selection = split_with_gold(prepared_dir, "selection", cfg, seed)
    return evaluate_models(
        models,
        records,
        gold,
        db_dir,
        cfg,
        seed,
        judge_cache,
        vllm,
        decoding,
        predictions,
        selection if selection[0] else None,
    )


def split_with_gold(
    prepared_dir: Path, split: str, cfg: EvaluateConfig, seed: int
) -> tuple[list[dict], list[sqlmod.ExecResult]]:
    """The seeded sample of a prepared split and its gold results ([] when the split is empty
    or absent); raises when gold SQL does not execute."""
    path = prepared_dir / f"{split}.jsonl"
    records = sample_records(read_jsonl(path), cfg.max_examples, seed) if path.is_file() else []
    gold = gold_results(records, prepared_dir / "databases", cfg.sql_timeout_s)
    broken = [r["id"] for r, g in zip(records, gold, strict=True) if not g.ok]
    if broken:
        raise ValueError(f"gold SQL fails to execute for {len(broken)} examples, e.g. {broken[:5]}")
    return records, gold


PREDICTION_COLUMNS = [
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
FLAT_METRICS = (
    "execution_accuracy",
    "execution_accuracy_nonempty",
    "exact_match",
    "valid_sql_rate",
    "judge_accuracy",
    "judge_execution_kappa",
    "generation_tokens_per_s",
)


def log_report(metrics: dict, rows: list[dict], paths: ReportPaths) -> None:
    """Figures, report files and the predictions/disagreements tables into the active run."""
    flat = {"eval_n_examples": metrics["n_examples"]}
    for name in model_names(metrics):
        flat |= {f"{name}_{k}": v for k in FLAT_METRICS if (v := metrics[name][k]) is not None}
        lo, hi = metrics[name]["execution_accuracy_ci95"]
        flat |= {f"{name}_execution_accuracy_ci95_lo": lo, f"{name}_execution_accuracy_ci95_hi": hi}
    if "selection" in metrics:  # the model-selection domain's figures, beside the reported ones
        picked = metrics["selection"]["tuned"]
        flat |= {f"selection_tuned_{k}": v for k in FLAT_METRICS if (v := picked[k]) is not None}
    judge_block = metrics["judge"]
    for key in ("calls", "cost_usd", "prompt_tokens", "completion_tokens", "errors"):
        flat[f"judge_{key}"] = judge_block.get(key, 0)
    mlflow.log_metrics(flat)
    for path in (paths.metrics, paths.breakdown, paths.disagreements):
        mlflow.log_artifact(str(path), artifact_path="eval")
    mlflow.log_table(pd.DataFrame(rows)[PREDICTION_COLUMNS], artifact_file="eval/predictions.json")
    found = disagreements(rows)
    if found:
        table = pd.DataFrame(found)[["disagreement", *PREDICTION_COLUMNS]]
        mlflow.log_table(table, artifact_file="eval/disagreements.json")


def log_to_mlflow(run_id: str, metrics: dict, rows: list[dict], paths: ReportPaths) -> None:
    """The report into the training's run (base vs tuned next to the training curves)."""
    with mlflow.start_run(run_id=run_id):
        log_report(metrics, rows, paths)


def report_paths(p: Params) -> ReportPaths:
    """Where the `evaluate` stage writes its report (params.yaml `paths:`)."""
    return ReportPaths(
        p.path("eval_metrics"),
        p.path("predictions"),
        p.path("eval_breakdown"),
        p.path("eval_disagreements"),
    )


def main() -> None:
    setup_entry_point()
    p = load_params()
    adapter = p.path("adapter")
    metrics, rows = run(
        p.evaluate,
        p.seed,
        p.path("base_model"),
        adapter,
        p.path("prepared"),
        p.path("judge_cache"),
        VLLMRuntime.of(p),
        p.decoding,
        p.path("predictions"),
    )
    paths = report_paths(p)
    write_report(paths, metrics, rows)
    train_info = json.loads((adapter / "train_info.json").read_text())
    configure_mlflow(p.mlflow)
    log_to_mlflow(train_info["run_id"], metrics, rows, paths)
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
