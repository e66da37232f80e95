"""The `train` stage: completion-only LoRA fine-tuning, tracked in MLflow, resumable.

Loss is computed on the SQL tokens only, and the LM head runs only at those positions (the
prompt is ~90% of each sequence, so this skips most of the vocabulary projection). Batches are
grouped by length and padded per batch. Every `checkpoint_every` steps the adapter, optimizer,
schedule and MLflow run id are saved; rerunning after an interruption resumes from there.

Run: `python -m pipelines.model.train` (dvc stage `train`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

import mlflow
from pipelines.config import MlflowConfig, TrainConfig, load_params, setup_entry_point
from pipelines.data.records import read_jsonl
from pipelines.lineage import base_model_info, dvc_hash, git_commit
from pipelines.model.base import load_base
from pipelines.model.prompt import build_completion, build_prompt
from pipelines.tracking import configure_mlflow

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    n_prompt: int  # tokens before the SQL; they get no loss


def tokenize(records: list[dict], tok, max_length: int) -> tuple[list[Example], int, list[dict]]:
    """Prompt + completion token ids per record; records over `max_length` are dropped.
    Returns (examples, number dropped, the records kept, aligned with the examples)."""
    examples, kept, dropped = [], [], 0
    for r in records:
        prompt = tok(build_prompt(r["ddl"], r["question"], tok), add_special_tokens=False)
        target = tok(build_completion(r["sql"], tok), add_special_tokens=False)
        ids = prompt.input_ids + target.input_ids
        if len(ids) > max_length:
            dropped += 1
            continue
        examples.append(Example(ids, len(prompt.input_ids)))
        kept.append(r)
    return examples, dropped, kept


def batch_schedule(
    groups: list[str], batch_size: int, n_batches: int, seed: int
) -> list[list[int]]:
    """`n_batches` index lists, each drawn from one group (one database, so one DDL): the
    examples of a batch then share their whole system + DDL prefix, which `completion_loss`
    runs once. Shuffled within groups and across batches each epoch; deterministic for a seed,
    so a resumed run sees the same batches as an uninterrupted one."""
    rng = random.Random(seed)
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    schedule: list[list[int]] = []
    while len(schedule) < n_batches:
        epoch = []
        for g in sorted(by_group):
            idxs = by_group[g][:]
            rng.shuffle(idxs)
            epoch += [idxs[b : b + batch_size] for b in range(0, len(idxs), batch_size)]
        rng.shuffle(epoch)
        schedule += epoch
    return schedule[:n_batches]


def shared_prefix_len(examples: list[Example]) -> int:
    """Tokens every example starts with, stopping before the last prompt token (whose hidden
    state predicts the first SQL token and so must be computed per example)."""
    limit = min(e.n_prompt for e in examples) - 1
    first = examples[0].input_ids
    n = 0
    while n < limit and all(e.input_ids[n] == first[n] for e in examples):
        n += 1
    return n


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, e.n_prompt : n] = ids[i, e.n_prompt : n]
    prefix = torch.tensor(shared_prefix_len(examples) if len(examples) > 1 else 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "prefix_len": prefix}


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
        torch.set_num_threads(os.cpu_count() or 1)
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
    records = read_jsonl(prepared_dir / "train.jsonl")
    examples, dropped, records = tokenize(records, tok, cfg.max_length)
    if not examples:
        raise ValueError(f"no training examples fit max_length={cfg.max_length}")
    n_micro = cfg.max_steps * cfg.grad_accum
    groups = [r["db_id"] for r in records]
    schedule = batch_schedule(groups, cfg.batch_size, n_micro, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(cfg))

    data_hash = dvc_hash(prepared_dir)
    base = base_model_info(base_dir)
    fingerprint = json.dumps([cfg.model_dump(mode="json"), seed, data_hash, base], sort_keys=True)
    state = _load_checkpoint(checkpoint_dir, fingerprint)
    step, history, run_id = 0, [], None
    if state:
        set_peft_model_state_dict(model, state["adapter"])
        optim.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, history, run_id = state["step"], state["history"], state["run_id"]
        log.info("resuming from checkpoint at step %d/%d", step, cfg.max_steps)

    configure_mlflow(mlflow_cfg)
    run_name = f"lora-r{cfg.lora_r}-a{cfg.lora_alpha}-{data_hash.removeprefix('sha256:')[:8]}"
    trainable = sum(p.numel() for p in params)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name) as active:
        run_id = active.info.run_id
        if not state:
            mlflow.log_params({**cfg.model_dump(mode="json"), "seed": seed})
            mlflow.log_params(
                {"n_train": len(examples), "dropped_too_long": dropped, "trainable": trainable}
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
        model.train()
        start, tokens_seen = time.monotonic(), 0
        window_start, window_tokens = start, 0
        while step < cfg.max_steps:
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                idxs = schedule[step * cfg.grad_accum + micro]
                batch = {
                    k: v.to(device)
                    for k, v in collate([examples[i] for i in idxs], tok.pad_token_id).items()
                }  # noqa: E501
                ctx = (
                    torch.autocast(device.type, dtype=autocast_dtype)
                    if autocast_dtype
                    else contextlib.nullcontext()
                )
                with ctx:
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
            if step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                _save_checkpoint(
                    checkpoint_dir, model, optim, sched, step, history, run_id, fingerprint
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


def _save_checkpoint(path: Path, model, optim, sched, step, history, run_id, fingerprint) -> None:
    path.mkdir(parents=True, exist_ok=True)
    state = {
        "adapter": get_peft_model_state_dict(model),
        "optimizer": optim.state_dict(),
        "scheduler": sched.state_dict(),
        "step": step,
        "history": history,
        "run_id": run_id,
        "fingerprint": fingerprint,
    }
    tmp = path / "state.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(path / "state.pt")  # atomic: a kill mid-save leaves the previous checkpoint
    log.info("checkpoint at step %d", step)


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
    keys = ("steps", "final_loss", "loss_first_10", "loss_last_10", "seconds", "tokens_per_s")
    out.write_text(json.dumps({k: info[k] for k in keys}, indent=2))
    if not math.isfinite(info["final_loss"] or float("nan")):
        raise SystemExit("training diverged: final loss is not finite")


if __name__ == "__main__":
    main()
