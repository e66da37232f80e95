"""The `train` stage: completion-only LoRA fine-tuning, tracked in MLflow, resumable.

Loss is computed on the SQL tokens only, and the LM head runs only at those positions (the
prompt is ~90% of each sequence, so this skips most of the vocabulary projection). Each batch
comes from one schema (one DDL text) and is padded to its own longest example. A small
in-domain dev split gives the eval loss every `eval_every` steps (and optional early stopping).
Every `checkpoint_every` steps the adapter, optimizer, schedule and MLflow run id are saved;
rerunning after an interruption resumes from there.

Run: `python -m pipelines.model.train` (dvc stage `train`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

import mlflow
from pipelines.config import MlflowConfig, TrainConfig, load_params, setup_entry_point
from pipelines.data.augment import augment
from pipelines.data.records import read_jsonl
from pipelines.lineage import base_model_info, dvc_hash, git_commit
from pipelines.model.base import load_base
from pipelines.model.batches import (
    IGNORE,
    Example,
    batch_schedule,
    collate,
    group_batches,
    split_dev,
    tokenize,
)
from pipelines.tracking import configure_mlflow

log = logging.getLogger(__name__)


def completion_loss(model, batch: dict[str, torch.Tensor], full_logits: bool = False):
    """Mean cross-entropy over the SQL tokens, and their count.

    The fast path runs the batch's shared prefix (system line + DDL, ~75% of the tokens) once
    and reuses its key/value cache for every example, then applies the LM head only at SQL
    positions. With `full_logits` every example runs in full and the head runs at every
    position, as a plain `model(labels=...)` does (the baseline `make bench` compares to)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    prefix = 0 if full_logits else int(batch.get("prefix_len", 0))
    if prefix:
        shared = decoder(input_ids=ids[:1, :prefix], use_cache=True).past_key_values
        shared.batch_repeat_interleave(ids.shape[0])
        hidden = decoder(
            input_ids=ids[:, prefix:], attention_mask=mask, past_key_values=shared
        ).last_hidden_state
    else:
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    # hidden[:, j] is position prefix + j and predicts the token after it.
    targets = labels[:, prefix + 1 :]
    hidden = hidden[:, :-1]
    keep = targets != IGNORE
    if full_logits:
        logits = head(hidden).float()
        return F.cross_entropy(logits[keep], targets[keep]), int(keep.sum())
    logits = head(hidden[keep]).float()
    return F.cross_entropy(logits, targets[keep]), int(keep.sum())


@torch.no_grad()
def eval_loss(model, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean loss per SQL token over the dev batches (dropout off)."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        loss, n = completion_loss(model, batch)
        total, count = total + loss.item() * n, count + n
    model.train()
    return total / max(count, 1)


def should_stop(dev_history: list[float], patience: int) -> bool:
    """Early stopping: the last `patience` evals all failed to beat the best before them."""
    if patience <= 0 or len(dev_history) <= patience:
        return False
    return min(dev_history[-patience:]) >= min(dev_history[:-patience])


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls (AVX512-BF16 or AMX). Without them bf16 autocast on CPU falls back
    to a path that was >20x slower than fp32 on this project's AVX2-only machines."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_device(precision: str) -> tuple[torch.device, torch.dtype | None]:
    """CUDA when present (TF32 on for fp32 matmuls); bf16 autocast when asked for, or with
    `auto` where the hardware computes bf16 natively."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        device, bf16_ok = torch.device("cuda"), torch.cuda.is_bf16_supported()
    else:
        # All cores unless the user capped them (OMP_NUM_THREADS, e.g. beside other jobs).
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
        device, bf16_ok = torch.device("cpu"), cpu_has_bf16()
    use_bf16 = precision == "bf16" or (precision == "auto" and bf16_ok)
    return device, torch.bfloat16 if use_bf16 else None


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
) -> dict:
    torch.manual_seed(seed)
    device, autocast_dtype = pick_device(cfg.precision)
    model, tok = load_base(base_dir)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora).to(device)
    train_records, dev_records = split_dev(
        read_jsonl(prepared_dir / "train.jsonl"), cfg.dev_examples, seed
    )
    train_records = augment(train_records, cfg.schema_augment, cfg.schema_variants, seed)
    examples, dropped, records = tokenize(train_records, tok, cfg.max_length)
    if not examples:
        raise ValueError(f"no training examples fit max_length={cfg.max_length}")
    dev, _, dev_records = tokenize(dev_records, tok, cfg.max_length)
    dev_batches = group_batches([r["ddl"] for r in dev_records], cfg.batch_size)
    n_micro = cfg.max_steps * cfg.grad_accum
    groups = [r["ddl"] for r in records]  # one DDL per batch: its prefix is run once
    schedule = batch_schedule(groups, cfg.batch_size, n_micro, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(cfg))

    data_hash = dvc_hash(prepared_dir)
    base = base_model_info(base_dir)
    fingerprint = json.dumps([cfg.model_dump(mode="json"), seed, data_hash, base], sort_keys=True)
    state = _load_checkpoint(checkpoint_dir, fingerprint)
    step, history, dev_history, run_id = 0, [], [], None
    if state:
        set_peft_model_state_dict(model, state["adapter"])
        optim.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, history, run_id = state["step"], state["history"], state["run_id"]
        dev_history = state["dev_history"]
        log.info("resuming from checkpoint at step %d/%d", step, cfg.max_steps)

    configure_mlflow(mlflow_cfg)
    run_name = f"lora-r{cfg.lora_r}-a{cfg.lora_alpha}-{data_hash.removeprefix('sha256:')[:8]}"
    trainable = sum(p.numel() for p in params)
    with mlflow.start_run(
        run_id=run_id, run_name=None if run_id else run_name, log_system_metrics=True
    ) as active:
        run_id = active.info.run_id
        if not state:
            mlflow.log_params({**cfg.model_dump(mode="json"), "seed": seed})
            mlflow.log_params(
                {
                    "n_train": len(examples),
                    "n_dev": len(dev),
                    "dropped_too_long": dropped,
                    "trainable": trainable,
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
            "training %d examples (%d dropped > %d tokens), %d trainable params, %s %s, run %s",
            len(examples),
            dropped,
            cfg.max_length,
            trainable,
            device,
            autocast_dtype or "fp32",
            run_id,
        )

        def autocast():
            if autocast_dtype:
                return torch.autocast(device.type, dtype=autocast_dtype)
            return contextlib.nullcontext()

        def batch_of(pool: list[Example], idxs: list[int]) -> dict[str, torch.Tensor]:
            batch = collate([pool[i] for i in idxs], tok.pad_token_id)
            return {k: v.to(device) for k, v in batch.items()}

        model.train()
        start, tokens_seen = time.monotonic(), 0
        window_start, window_tokens = start, 0
        while step < cfg.max_steps and not should_stop(dev_history, cfg.early_stopping_patience):
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                batch = batch_of(examples, schedule[step * cfg.grad_accum + micro])
                with autocast():
                    loss, _ = completion_loss(model, batch)
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.item() / cfg.grad_accum
                # Example tokens trained on (as in `make bench`), not the fewer ones computed.
                n_tok = int(batch["attention_mask"].sum())
                tokens_seen += n_tok
                window_tokens += n_tok
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
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
                    dev_loss = eval_loss(model, [batch_of(dev, b) for b in dev_batches])
                dev_history.append(dev_loss)
                mlflow.log_metric("eval_loss", dev_loss, step=step)
                log.info(
                    "step %d/%d eval loss %.4f (%d dev examples)",
                    step,
                    cfg.max_steps,
                    dev_loss,
                    len(dev),
                )
            if step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                _save_checkpoint(
                    checkpoint_dir,
                    model,
                    optim,
                    sched,
                    {"step": step, "history": history, "dev_history": dev_history},
                    run_id,
                    fingerprint,
                )
        seconds = time.monotonic() - start
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        model.save_pretrained(adapter_dir)
        tok.save_pretrained(adapter_dir)
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
        }
        (adapter_dir / "train_info.json").write_text(json.dumps(info, indent=2))
        mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
        mlflow.log_metrics({"final_loss": info["final_loss"], "train_seconds": seconds})
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    log.info("adapter saved to %s after %d steps in %.0f s", adapter_dir, step, seconds)
    return info


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


def main() -> None:
    setup_entry_point()
    p = load_params()
    info = run(
        p.train,
        p.seed,
        p.path("base_model"),
        p.path("prepared"),
        p.path("adapter"),
        p.path("checkpoints"),
        p.mlflow,
    )
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
