"""The `evaluate` stage: base vs fine-tuned model on the held-out eval split.

For each model: generation through `pipelines.model.backends` (offline vLLM on the merged
weights or transformers; `evaluate.backend`) with the gateway's decoding (params.yaml
`decoding:`, `pipelines.model.decoding`: candidates, grammar, choice by execution), then every
predicted query is guarded and executed read-only against the example's database and compared
with the gold result (execution accuracy), normalised and compared as text (exact match), and,
when an OpenAI-compatible endpoint is configured, judged by an LLM (every example, or with
`evaluate.judge.only_execution_failures` only those execution marks wrong); each wrong answer
gets a failure class (`pipelines.eval.failures`). Beside the reported `eval` split, the
model-selection split (tuned model) and the real-schema split (base and tuned;
`data.real_schema`) are scored in the same generations, each under its own key of eval.json,
their rows in the predictions labelled by `dataset`. Writes the report
(`pipelines.eval.report`: metrics/eval.json, predictions, the breakdown for DVC plots, the
judge-vs-execution disagreements) and logs it into the training's MLflow run.
`evaluate_models` is the scoring loop `sqlops eval` reuses for registered models and benchmarks.

Run: `python -m pipelines.eval.evaluate` (dvc stage `evaluate`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
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
from pipelines.eval.failures import CLASSES, failure_of, summary_line
from pipelines.eval.judge import JudgeItem, JudgeReport, judge
from pipelines.eval.metrics import disagreements, score_example, summarize
from pipelines.eval.report import EXTRA_SPLITS, ReportPaths, model_names, write_report
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
        rows[-1]["failure"] = failure_of(rows[-1])
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


@dataclass(frozen=True)
class Extra:
    """A split scored beside the reported one, in the same generations (one engine start-up
    per model): its records, their gold results, and the models that answer it."""

    records: list[dict]
    gold: list[sqlmod.ExecResult]
    models: tuple[str, ...]


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
    extras: dict[str, Extra] | None = None,
) -> tuple[dict, list[dict]]:
    """Generate, score and judge every model on the same examples; one model in memory at a
    time. Returns (metrics in the eval.json shape, one `M` block per model name; rows, each
    with its `dataset`: "eval" for `records`).

    `extras` (name → Extra): splits the models named in each also answer in the same
    generation (one engine start-up, ~4 min for vLLM on a 2-core AVX2 CPU), scored apart
    under `metrics[name]` = {domains, n_examples, <model>: M}; their rows are labelled `name`.

    With `predictions`, the scored rows of every finished model are written there as soon as
    it finishes (unjudged; the report rewrites the file at the end), so that a later model or
    the judge failing loses only what was not finished."""
    all_rows, speed, extras = [], {}, extras or {}
    for name, load in models.items():
        mine = {k: e for k, e in extras.items() if name in e.models and e.records}
        asked = records + [r for e in mine.values() for r in e.records]
        golds = gold + [g for e in mine.values() for g in e.gold]
        rows, gen = evaluate_model(load(), asked, golds, db_dir, cfg, vllm, decoding)
        datasets = ["eval"] * len(records) + [k for k, e in mine.items() for _ in e.records]
        speed[name] = gen.tokens_per_s
        all_rows += [
            {"model": name, "dataset": d, **row} for d, row in zip(datasets, rows, strict=True)
        ]
        if predictions is not None:
            predictions.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(predictions, all_rows)
            log.info("%s: %d predictions written to %s", name, len(rows), predictions)
    main = [r for r in all_rows if r["dataset"] == "eval"]
    report = apply_judge(main, records, cfg, judge_cache)
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
        rows = [r for r in main if r["model"] == name]
        metrics[name] = summarize(rows, cfg.bootstrap_samples, seed, speed[name], failures_only)
    for key, e in extras.items():
        scored = [r for r in all_rows if r["dataset"] == key]
        if not scored:
            continue
        apply_judge(scored, e.records, cfg, judge_cache)
        metrics[key] = {
            "domains": sorted({r["domain"] for r in e.records}),
            "n_examples": len(e.records),
        }
        for name in (m for m in models if m in e.models):
            rows = [r for r in scored if r["model"] == name]
            metrics[key][name] = summarize(
                rows, cfg.bootstrap_samples, seed, speed[name], failures_only
            )
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
    knobs are chosen on, under `metrics["selection"]`; both models on the real-schema split
    (`data.real_schema`) when there is one, under `metrics["real_schema"]`: a figure to read,
    never to choose knobs on. `predictions`: see `evaluate_models`."""
    db_dir = prepared_dir / "databases"
    models = {
        "base": lambda: ModelSpec(base_dir),
        "tuned": lambda: ModelSpec(base_dir, adapter_dir),
    }
    records, gold = split_with_gold(prepared_dir, "eval", cfg, seed)
    answering = {"selection": ("tuned",), "real_schema": ("base", "tuned")}
    extras = {
        split: Extra(*split_with_gold(prepared_dir, split, cfg, seed), answering[split])
        for split in EXTRA_SPLITS
    }
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
        extras,
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
    "dataset",
    "failure",
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
        flat |= _failure_metrics(f"{name}_", metrics[name])
    for split in EXTRA_SPLITS:  # model selection and real schemas, beside the reported figures
        block = metrics.get(split) or {}
        for name in model_names(block):
            m, prefix = block[name], f"{split}_{name}_"
            flat |= {f"{prefix}{k}": v for k in FLAT_METRICS if (v := m[k]) is not None}
            flat |= _failure_metrics(prefix, m)
    judge_block = metrics["judge"]
    for key in ("calls", "cost_usd", "prompt_tokens", "completion_tokens", "errors"):
        flat[f"judge_{key}"] = judge_block.get(key, 0)
    mlflow.log_metrics(flat)
    for path in (paths.metrics, paths.breakdown, paths.disagreements):
        mlflow.log_artifact(str(path), artifact_path="eval")
    mlflow.log_table(pd.DataFrame(rows)[PREDICTION_COLUMNS], artifact_file="eval/predictions.json")
    found = disagreements([r for r in rows if r.get("dataset", "eval") == "eval"])
    if found:
        table = pd.DataFrame(found)[["disagreement", *PREDICTION_COLUMNS]]
        mlflow.log_table(table, artifact_file="eval/disagreements.json")


def _failure_metrics(prefix: str, m: dict) -> dict[str, int]:
    """`<prefix>failures_<class>`: the wrong answers of one M block per failure class."""
    found = m.get("failures") or {}
    return {f"{prefix}failures_{c}": found.get(c, 0) for c in CLASSES}


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
    if "real_schema" in metrics:
        real = metrics["real_schema"]
        log.info(
            "real-schema set (%d examples): base %.1f%% -> tuned %.1f%%; tuned failures: %s",
            real["n_examples"],
            100 * real["base"]["execution_accuracy"],
            100 * real["tuned"]["execution_accuracy"],
            summary_line(real["tuned"]["failures"]),
        )


if __name__ == "__main__":
    main()
