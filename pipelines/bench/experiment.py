"""Training experiments: the same budget under several train settings, one comparison table.

Each variant is a normal training run (MLflow run `lora-r<r>-...`, tagged `experiment=<name>`)
followed by the held-out evaluation of its adapter on the same examples as the `evaluate`
stage. The table gives eval loss (in-domain dev split), held-out execution accuracy, held-out
loss (per SQL token, over the whole eval split: much steadier than an accuracy on ~100
examples) and seconds per step per variant.

    sqlops experiment lora-rank [--ranks 8 16 64] [--steps N]   the seed book's rank grid
    sqlops experiment precision [--steps N]                     fp32 vs bf16 autocast

Writes reports/experiments/<name>.{json,md}; the markdown also goes to each run in MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import torch

import mlflow
from pipelines.config import Params
from pipelines.data.records import read_jsonl, sample_records
from pipelines.eval.evaluate import evaluate_model, gold_results
from pipelines.model import devices, train
from pipelines.model.backends import ModelSpec
from pipelines.model.base import load_base
from pipelines.model.batches import collate, group_batches, tokenize
from pipelines.model.loss import CompletionLoss, eval_loss
from pipelines.vllm_runtime import VLLMRuntime

log = logging.getLogger(__name__)


def lora_rank_variants(ranks: list[int]) -> list[dict]:
    """alpha = 2r keeps the default's LoRA scale (r16 / alpha32) at every rank."""
    return [{"lora_r": r, "lora_alpha": 2 * r} for r in ranks]


PRECISION_VARIANTS = [{"precision": "fp32"}, {"precision": "bf16"}]


def run(
    p: Params,
    name: str,
    variants: list[dict],
    steps: int | None = None,
) -> Path:
    """Trains and evaluates one adapter per variant; returns the markdown table's path."""
    out_dir, vllm = p.path("experiments"), VLLMRuntime.of(p)
    prepared = p.path("prepared")
    db_dir = prepared / "databases"
    heldout = read_jsonl(prepared / "eval.jsonl")
    records = sample_records(heldout, p.evaluate.max_examples, p.seed)
    gold = gold_results(records, db_dir, p.evaluate.sql_timeout_s)
    work = out_dir / name
    vllm = dataclasses.replace(vllm, merged_root=work / "merged")  # removed after each variant
    rows = []
    for variant in variants:
        cfg = p.train.model_copy(update={**variant, "max_steps": steps or p.train.max_steps})
        label = ", ".join(f"{k}={v}" for k, v in variant.items())
        adapter = work / "adapter"
        info = train.run(
            cfg, p.seed, p.path("base_model"), prepared, adapter, work / "checkpoint", p.mlflow
        )
        spec = ModelSpec(p.path("base_model"), adapter)
        scored, _ = evaluate_model(spec, records, gold, db_dir, p.evaluate, vllm, p.decoding)
        accuracy = sum(r["execution_match"] for r in scored) / len(scored)
        loss = heldout_loss(p, adapter, heldout, cfg.precision)
        rows.append(
            {
                "variant": label,
                **variant,
                "steps": info["steps"],
                "eval_loss": info["eval_loss"],
                "execution_accuracy": accuracy,
                "heldout_loss": loss,
                "s_per_step": info["s_per_step"],
                "run_id": info["run_id"],
            }
        )
        with mlflow.start_run(run_id=info["run_id"]):
            mlflow.set_tag("experiment", name)
            mlflow.log_metrics({"tuned_execution_accuracy": accuracy, "heldout_loss": loss})
        log.info("%s: execution accuracy %.3f, held-out loss %.4f", label, accuracy, loss)
        shutil.rmtree(adapter)  # the MLflow run keeps the adapter
        shutil.rmtree(work / "merged", ignore_errors=True)  # vLLM's merged copy, if any
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(rows, indent=2))
    md = out_dir / f"{name}.md"
    md.write_text(to_markdown(name, rows, len(records)))
    for row in rows:
        with mlflow.start_run(run_id=row["run_id"]):
            mlflow.log_artifact(str(md), artifact_path="experiments")
    return md


def heldout_loss(p: Params, adapter: Path, records: list[dict], precision: str) -> float:
    """Mean loss per SQL token of base + adapter on `records` (the held-out eval split), in
    the training's precision, batches of `train.batch_size`."""
    model, tok = load_base(p.path("base_model"), adapter, merge=False)
    device, dtype = devices.pick_device(precision)
    # Every record counts: the length limit is the one generation has, not training's.
    examples, _, kept = tokenize(records, tok, p.vllm.max_model_len)
    batches = []  # one DDL per batch: its prefix runs once, as in training
    for idxs in group_batches([r["ddl"] for r in kept], p.train.batch_size):
        batch = collate([examples[i] for i in idxs], tok.pad_token_id)
        batches.append({k: v.to(device) for k, v in batch.items()})
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    with torch.no_grad(), autocast:
        return eval_loss(CompletionLoss(model.to(device)), batches)


def to_markdown(name: str, rows: list[dict], n_eval: int) -> str:
    lines = [
        f"Experiment `{name}`: same steps per variant; execution accuracy on {n_eval} held-out "
        "examples, eval loss on the in-domain dev split, held-out loss per SQL token on the whole "
        "eval split.",
        "",
        "| variant | steps | eval loss | execution accuracy | held-out loss | s/step "
        "| MLflow run |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        loss = "n/a" if r["eval_loss"] is None else f"{r['eval_loss']:.4f}"
        lines.append(
            f"| {r['variant']} | {r['steps']} | {loss} | {100 * r['execution_accuracy']:.1f}% "
            f"| {r['heldout_loss']:.4f} | {r['s_per_step']:.2f} | {r['run_id']} |"
        )
    return "\n".join(lines) + "\n"
