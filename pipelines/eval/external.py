"""`sqlops eval`: score a registered model version (or the base model) on an external benchmark.

    sqlops eval --dataset spider:<dir> --model models:/text2sql@champion [--model base]
                [--max-examples N] [--out DIR]

The dataset is read by the importer `prepare` uses for Spider-format sources, its databases are
copied under DIR/databases, and the models are scored by `evaluate_models`, the `evaluate`
stage's own loop: DIR gets the same report (eval.json, predictions, breakdown, disagreements;
each wrong answer with its failure class, `pipelines.eval.failures`) and an MLflow run
(`eval-<dataset>`) gets the figures and tables. A registered version loads
through its MLflow pyfunc (LoRA adapter artifact on its own base model, found by weights hash
here or fetched from MLflow: pipelines/model/base_store.py) and generates through
`pipelines.model.backends` like the `evaluate` stage; `base` is `paths.base_model` alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mlflow.exceptions import MlflowException

import mlflow
from mlflow import MlflowClient
from pipelines.config import DataConfig, Params, SourceConfig
from pipelines.data import sources
from pipelines.data.prepare import install_databases
from pipelines.data.records import sample_records
from pipelines.data.schema_fit import prompt_ddl
from pipelines.db_schema import ddl_of
from pipelines.eval.evaluate import (
    ModelLoader,
    evaluate_models,
    gold_results,
    log_report,
)
from pipelines.eval.failures import summary_line
from pipelines.eval.report import ReportPaths, write_report
from pipelines.model.backends import ModelSpec
from pipelines.model.base_store import version_base_dir
from pipelines.tracking import configure_mlflow
from pipelines.vllm_runtime import VLLMRuntime

log = logging.getLogger(__name__)
DATASET_KINDS = ("spider",)  # `kind:path` forms --dataset accepts


def default_out_dir(p: Params, dataset: str) -> Path:
    kind, _, path = dataset.partition(":")
    return p.path("external_eval") / f"{kind}-{Path(path).resolve().name}"


def load_dataset(
    dataset: str, max_examples: int, seed: int, db_dir: Path, data: DataConfig
) -> list[dict]:
    """Canonical records of a `spider:<dir>` dataset (a seeded sample of `max_examples`, 0 =
    all), with the DDL read from each database and fitted to the question as `prepare` fits
    it; the databases they use land in `db_dir`."""
    kind, _, path = dataset.partition(":")
    if kind not in DATASET_KINDS or not path:
        raise ValueError(f"--dataset must look like spider:<dir>, got {dataset!r}")
    src = SourceConfig(type=kind, path=Path(path).resolve())
    imported = sources.load(src, synthetic_dir=db_dir)  # (the Spider importer ignores it)
    records = sample_records(imported.records, max_examples, seed)
    install_databases(records, imported.databases, db_dir)
    ddl: dict[str, str] = {}
    for r in records:
        if r["db_id"] not in ddl:
            ddl[r["db_id"]] = ddl_of(db_dir / f"{r['db_id']}.sqlite", data.sample_values)
        r["ddl"] = prompt_ddl(
            r["ddl"] or ddl[r["db_id"]],
            r["question"],
            data.max_ddl_chars,
            db_dir / f"{r['db_id']}.sqlite",
            inferred=data.inferred_joins,
            value_links=data.value_links,
        )
    return records


def model_loader(spec: str, p: Params, work_dir: Path) -> tuple[str, ModelLoader, dict]:
    """(report label, loader, lineage) for `base` or `models:/<name>@<alias>|/<version>`;
    a registered version's files are downloaded under `work_dir`."""
    if spec == "base":
        base_dir = p.path("base_model")
        return "base", lambda: ModelSpec(base_dir), {"uri": "base", "path": str(base_dir)}
    if not spec.startswith("models:/"):
        raise ValueError(f"--model must be `base` or models:/<name>@<alias>, got {spec!r}")
    ref = spec.removeprefix("models:/")
    client = MlflowClient()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
            label = f"{name}-{alias}"
        else:
            name, _, version = ref.partition("/")
            mv = client.get_model_version(name, version)
            label = f"{name}-v{mv.version}"
    except MlflowException as e:
        raise ValueError(f"{spec}: no such registered model version ({e.message})") from e
    info = {"uri": spec, "name": name, "version": int(mv.version), "run_id": mv.run_id}
    # Its own base model, found (or fetched from MLflow) now: a missing one is a one-line
    # error before anything slow runs.
    version_base_dir(p, client, name, int(mv.version))
    here = {
        "base_model_path": str(p.path("base_model")),
        "base_store_path": str(p.path("base_models")),
    }

    def load() -> ModelSpec:
        # The registered pyfunc finds its base weights (by hash) and names its adapter's folder.
        uri, dst = f"models:/{name}/{mv.version}", work_dir / label
        dst.mkdir(parents=True, exist_ok=True)
        model = mlflow.pyfunc.load_model(uri, dst_path=str(dst), model_config=here)
        wrapper = model.unwrap_python_model()
        return ModelSpec(wrapper.base_dir, wrapper.adapter_dir)

    return label, load, info  # the label names MLflow metrics: no `@` or `/`


def run(
    p: Params,
    dataset: str,
    model_specs: list[str],
    out_dir: Path,
    max_examples: int | None = None,
) -> dict:
    """Evaluate every model on the dataset; writes the report under `out_dir`, returns metrics.

    `max_examples` overrides `evaluate.max_examples` (0 = the whole dataset)."""
    cfg = p.evaluate
    if max_examples is not None:
        cfg = cfg.model_copy(update={"max_examples": max_examples})
    configure_mlflow(p.mlflow)
    models, lineage = {}, {}
    for spec in model_specs:  # resolve every model before the slow part
        label, models[label], lineage[label] = model_loader(spec, p, out_dir / "models")

    db_dir = out_dir / "databases"
    records = load_dataset(dataset, cfg.max_examples, p.seed, db_dir, p.data)
    gold = gold_results(records, db_dir, cfg.sql_timeout_s)
    bad = [r["id"] for r, g in zip(records, gold, strict=True) if not g.ok]
    if bad:
        log.warning("%d gold queries fail to execute and are left out, e.g. %s", len(bad), bad[:5])
    if len(bad) == len(records):
        raise ValueError(f"no example of {dataset} has gold SQL that executes")
    kept = [i for i, g in enumerate(gold) if g.ok]
    records, gold = [records[i] for i in kept], [gold[i] for i in kept]

    paths = ReportPaths.under(out_dir)
    metrics, rows = evaluate_models(
        models,
        records,
        gold,
        db_dir,
        cfg,
        p.seed,
        p.path("judge_cache"),
        VLLMRuntime.of(p),
        p.decoding,
        paths.predictions,
    )
    metrics["dataset"] = {"spec": dataset, "gold_errors": len(bad)}
    metrics["models"] = lineage
    write_report(paths, metrics, rows)
    with mlflow.start_run(run_name=f"eval-{out_dir.name}"):
        mlflow.set_tags({"eval_dataset": dataset, "eval_models": " ".join(model_specs)})
        log_report(metrics, rows, paths)
    for label in models:
        log.info(
            "%s on %s (%d examples): execution accuracy %.1f%%; wrong answers: %s",
            label,
            dataset,
            metrics["n_examples"],
            100 * metrics[label]["execution_accuracy"],
            summary_line(metrics[label]["failures"]),
        )
    return metrics
