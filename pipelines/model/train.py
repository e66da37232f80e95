"""The `train` stage: completion-only LoRA fine-tuning, tracked in MLflow, resumable.

Loss is computed on the SQL tokens only (`loss`). Each batch
comes from one schema (one DDL text) and is padded to its own longest example. A small
in-domain dev split gives the eval loss every `eval_every` steps (and optional early stopping).
Every `checkpoint_every` steps the adapter, optimizer, schedule and MLflow run id are saved;
rerunning after an interruption resumes from there. With `train.num_processes > 1` the entry
point re-launches itself through `accelerate launch` (see `devices`): each process trains on its
share of every batch, gradients are all-reduced, and rank 0 alone tracks and writes.

Run: `python -m pipelines.model.train [--params FILE]` (dvc stage `train`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

import mlflow
from pipelines.config import PARAMS_FILE, MlflowConfig, TrainConfig, load_params, setup_entry_point
from pipelines.data.augment import augment
from pipelines.data.records import read_jsonl
from pipelines.lineage import base_model_info, dvc_hash, git_commit
from pipelines.model import devices
from pipelines.model.batches import (
    Example,
    batch_schedule,
    collate,
    group_batches,
    repeat_feedback,
    split_dev,
    tokenize,
)
from pipelines.model.loss import CompletionLoss, eval_loss
from pipelines.tracking import configure_mlflow

log = logging.getLogger(__name__)


def should_stop(dev_history: list[float], patience: int) -> bool:
    """Early stopping: the last `patience` evals all failed to beat the best before them."""
    if patience <= 0 or len(dev_history) <= patience:
        return False
    return min(dev_history[-patience:]) >= min(dev_history[:-patience])


def lr_lambda(cfg: TrainConfig):
    warmup = max(1, int(cfg.max_steps * cfg.warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (cfg.max_steps - step) / max(1, cfg.max_steps - warmup))

    return factor


def run(
    cfg: TrainConfig,
    seed: int,
    base_dir: Path,
    prepared_dir: Path,
    adapter_dir: Path,
    checkpoint_dir: Path,
    mlflow_cfg: MlflowConfig,
) -> dict | None:
    """Train and save the adapter; its train_info (None on ranks other than 0)."""
    devices.check_quantization(cfg.quantization)
    torch.manual_seed(seed)
    procs = devices.Processes(cfg.grad_accum)
    if not procs.is_main:
        log.setLevel(logging.WARNING)  # rank 0 reports
    device, autocast_dtype = devices.pick_device(cfg.precision, procs.device, procs.world)
    share_prefix = devices.shares_prefix(cfg.shared_prefix, device)
    model, tok = devices.load_for_training(base_dir, cfg.quantization, device)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if cfg.quantization == "none":  # 4-bit weights were loaded onto the device
        model = model.to(device)
    train_records, dev_records = split_dev(
        read_jsonl(prepared_dir / "train.jsonl"), cfg.dev_examples, seed
    )
    train_records = repeat_feedback(train_records, cfg.feedback_repeat)
    train_records = augment(
        train_records,
        cfg.schema_augment,
        cfg.schema_variants,
        seed,
        cfg.schema_p_table,
        cfg.schema_p_column,
    )
    examples, dropped, records = tokenize(train_records, tok, cfg.max_length)
    if not examples:
        raise ValueError(f"no training examples fit max_length={cfg.max_length}")
    dev, _, dev_records = tokenize(dev_records, tok, cfg.max_length)
    dev_batches = group_batches([r["ddl"] for r in dev_records], cfg.batch_size)
    n_micro = cfg.max_steps * cfg.grad_accum
    groups = [r["ddl"] for r in records]  # one DDL per batch: its prefix is run once
    schedule = batch_schedule(groups, cfg.batch_size, n_micro, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"  # one kernel for all parameters instead of one per tensor
    optim = torch.optim.AdamW(
        params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused
    )
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(cfg))

    data_hash = dvc_hash(prepared_dir)
    base = base_model_info(base_dir)
    fingerprint = json.dumps([cfg.model_dump(mode="json"), seed, data_hash, base], sort_keys=True)
    if procs.sharded:
        log.warning("no resumable checkpoints under FSDP/DeepSpeed: no rank holds all state")
    state = None if procs.sharded else _load_checkpoint(checkpoint_dir, fingerprint)
    step, history, dev_history, run_id = 0, [], [], None
    if state:
        set_peft_model_state_dict(model, state["adapter"])
        optim.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, history, run_id = state["step"], state["history"], state["run_id"]
        dev_history = state["dev_history"]
        log.info("resuming from checkpoint at step %d/%d", step, cfg.max_steps)
    loss_module, optim = procs.prepare(CompletionLoss(model), optim, cfg.batch_size)

    run_name = f"lora-r{cfg.lora_r}-a{cfg.lora_alpha}-{data_hash.removeprefix('sha256:')[:8]}"
    trainable = sum(p.numel() for p in params)
    tracking = contextlib.nullcontext()  # other ranks: rank 0 alone talks to MLflow
    if procs.is_main:
        configure_mlflow(mlflow_cfg)
        tracking = mlflow.start_run(
            run_id=run_id, run_name=None if run_id else run_name, log_system_metrics=True
        )
    with tracking as active:
        run_id = active.info.run_id if procs.is_main else None
        if procs.is_main and not state:
            mlflow.log_params({**cfg.model_dump(mode="json"), "seed": seed})
            mlflow.log_params(
                {
                    "n_train": len(examples),
                    "n_dev": len(dev),
                    "dropped_too_long": dropped,
                    "trainable": trainable,
                    "processes": procs.world,
                }
            )
            mlflow.set_tags(
                {
                    "git_commit": git_commit(),
                    "data_hash": data_hash,
                    "base_model": base["id"],
                    "base_model_hash": base["weights_sha256"],
                    "stage": "train",
                }
            )
        log.info(
            "training %d examples (%d dropped > %d tokens), %d trainable params, %dx%s %s, run %s",
            len(examples),
            dropped,
            cfg.max_length,
            trainable,
            procs.world,
            device,
            autocast_dtype or "fp32",
            run_id,
        )

        def autocast():
            if autocast_dtype:
                return torch.autocast(device.type, dtype=autocast_dtype)
            return contextlib.nullcontext()

        def batch_of(pool: list[Example], idxs: list[int]) -> dict[str, torch.Tensor]:
            batch = collate([pool[i] for i in idxs], tok.pad_token_id, share_prefix)
            return {k: v.to(device) for k, v in batch.items()}

        loss_module.train()
        start, tokens_seen = time.monotonic(), 0
        window_start, window_tokens = start, 0
        while step < cfg.max_steps and not should_stop(dev_history, cfg.early_stopping_patience):
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                idxs = schedule[step * cfg.grad_accum + micro]
                mine, weight = procs.shard(idxs)
                batch = batch_of(examples, mine)
                with procs.micro_step(loss_module):
                    with autocast():
                        loss, n = loss_module(batch)
                    # This rank's part of the global batch's mean over its SQL tokens (1 with
                    # one process); the all-reduce averages ranks, hence the `world` factor.
                    n_sql = sum(len(examples[i].input_ids) - examples[i].n_prompt for i in idxs)
                    share = weight * n / n_sql
                    procs.backward(loss * (share * procs.world) if procs.world > 1 else loss)
                loss_sum += loss.item() * share / cfg.grad_accum
                # Example tokens trained on (as in `make bench`), not the fewer ones computed.
                n_tok = sum(len(examples[i].input_ids) for i in idxs)
                tokens_seen += n_tok
                window_tokens += n_tok
            loss_sum = procs.sum(loss_sum)
            grad_norm = procs.clip_grad_norm(loss_module, params, cfg.grad_clip)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            step += 1
            history.append(loss_sum)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                now = time.monotonic()
                tps = window_tokens / max(now - window_start, 1e-9)
                window_start, window_tokens = now, 0
                metrics = {
                    "train_loss": loss_sum,
                    "learning_rate": sched.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "tokens_per_s": tps,
                }
                if procs.is_main:
                    mlflow.log_metrics(metrics, step=step)
                log.info(
                    "step %d/%d loss %.4f lr %.2e grad %.2f %.0f tok/s",
                    step,
                    cfg.max_steps,
                    loss_sum,
                    metrics["learning_rate"],
                    grad_norm,
                    tps,
                )
            if dev and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                with autocast():
                    dev_loss = eval_loss(loss_module, [batch_of(dev, b) for b in dev_batches])
                dev_loss = procs.mean(dev_loss)  # one value on every rank: they stop together
                dev_history.append(dev_loss)
                if procs.is_main:
                    mlflow.log_metric("eval_loss", dev_loss, step=step)
                log.info(
                    "step %d/%d eval loss %.4f (%d dev examples)",
                    step,
                    cfg.max_steps,
                    dev_loss,
                    len(dev),
                )
            checkpoint = step % cfg.checkpoint_every == 0 and step < cfg.max_steps
            if checkpoint and not procs.sharded:
                if procs.is_main:  # DDP: every rank holds the same adapter and optimizer
                    _save_checkpoint(
                        checkpoint_dir,
                        model,
                        optim,
                        sched,
                        {"step": step, "history": history, "dev_history": dev_history},
                        run_id,
                        fingerprint,
                    )
                procs.wait()
        seconds = time.monotonic() - start
        gathered = procs.gathered_state(loss_module)
        if not procs.is_main:
            procs.wait()  # until rank 0 has saved
            procs.end()
            return None
        _save_adapter(model, tok, adapter_dir, gathered)
        info = {
            "run_id": run_id,
            "steps": step,
            "final_loss": history[-1] if history else None,
            "loss_first_10": sum(history[:10]) / max(1, len(history[:10])),
            "loss_last_10": sum(history[-10:]) / max(1, len(history[-10:])),
            "eval_loss": dev_history[-1] if dev_history else None,
            "early_stopped": step < cfg.max_steps,
            "seconds": seconds,
            "tokens_per_s": tokens_seen / max(seconds, 1e-9),
            "s_per_step": seconds / max(1, step - (state["step"] if state else 0)),
            "n_train": len(examples),
            "data_hash": data_hash,
            "base_model": base["id"],
            "base_model_hash": base["weights_sha256"],
            "precision": str(autocast_dtype or "fp32"),
            "device": device.type,
            "processes": procs.world,
            "optimizer": "adamw_fused" if fused else "adamw",
            "shared_prefix": share_prefix,
            "quantization": cfg.quantization,
        }
        (adapter_dir / "train_info.json").write_text(json.dumps(info, indent=2))
        mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
        mlflow.log_metrics({"final_loss": info["final_loss"], "train_seconds": seconds})
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    log.info("adapter saved to %s after %d steps in %.0f s", adapter_dir, step, seconds)
    procs.wait()
    procs.end()
    return info


def _save_adapter(model, tok, adapter_dir: Path, gathered: dict | None) -> None:
    """The LoRA weights + tokenizer; from the state gathered across ranks where sharded."""
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    state = None
    if gathered is not None:  # keys of the CompletionLoss wrapper: "model.<peft key>"
        state = {k.removeprefix("model."): v for k, v in gathered.items()}
    model.save_pretrained(adapter_dir, state_dict=state)
    tok.save_pretrained(adapter_dir)


def _save_checkpoint(path: Path, model, optim, sched, progress, run_id, fingerprint) -> None:
    path.mkdir(parents=True, exist_ok=True)
    state = {
        "adapter": get_peft_model_state_dict(model),
        "optimizer": optim.state_dict(),
        "scheduler": sched.state_dict(),
        **progress,  # step, loss history, dev loss history
        "run_id": run_id,
        "fingerprint": fingerprint,
    }
    tmp = path / "state.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(path / "state.pt")  # atomic: a kill mid-save leaves the previous checkpoint
    log.info("checkpoint at step %d", progress["step"])


def _load_checkpoint(path: Path, fingerprint: str) -> dict | None:
    file = path / "state.pt"
    if not file.is_file():
        return None
    state = torch.load(file, weights_only=False)
    if state.get("fingerprint") != fingerprint:
        log.info("ignoring checkpoint from a different config or data")
        return None
    return state


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The train stage (params.yaml `train:`).")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="another params file")
    params_file = parser.parse_args(argv).params.resolve()
    setup_entry_point()
    p = load_params(params_file)
    if devices.should_launch(p.train):
        devices.check_quantization(p.train.quantization)
        rc = devices.launch(p.train, "pipelines.model.train", ["--params", str(params_file)])
        if rc:
            raise SystemExit(f"training processes failed (exit code {rc})")
        return
    info = run(
        p.train,
        p.seed,
        p.path("base_model"),
        p.path("prepared"),
        p.path("adapter"),
        p.path("checkpoints"),
        p.mlflow,
    )
    if info is None:
        return  # not rank 0: it writes the metrics
    out = p.path("train_metrics")
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = (
        "steps",
        "final_loss",
        "loss_first_10",
        "loss_last_10",
        "eval_loss",
        "seconds",
        "s_per_step",
        "tokens_per_s",
    )
    out.write_text(json.dumps({k: info[k] for k in keys}, indent=2))
    if not math.isfinite(info["final_loss"] or float("nan")):
        raise SystemExit("training diverged: final loss is not finite")


if __name__ == "__main__":
    main()
