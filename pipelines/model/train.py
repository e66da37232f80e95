"""The `train` stage: completion-only LoRA fine-tuning, tracked in MLflow, resumable.

Loss is computed on the SQL tokens only (`loss`). Each batch comes from one schema (one DDL
text) and is padded to its own longest example. A small in-domain dev split gives the eval loss
every `eval_every` steps (and optional early stopping).
Every `checkpoint_every` steps the adapter, optimizer, schedule and MLflow run id are saved;
rerunning after an interruption resumes from there. With `train.num_processes > 1` the entry
point re-launches itself through `accelerate launch` (see `devices`): each process trains on its
share of every batch, gradients are all-reduced, and rank 0 alone tracks and writes.

It reads like nanoGPT's train.py, one piece per step, each callable alone: `prepare_examples`
(tokenized train and dev examples, the batch schedule), `build_model_and_optimizer`, and
`loop.train_loop`, which returns the `History` (losses, eval losses, steps, tokens/s). `run`
only wires them, with the checkpoint resume and the MLflow run around the loop.

Run: `python -m pipelines.model.train [--params FILE]` (dvc stage `train`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

import mlflow
from pipelines.config import PARAMS_FILE, MlflowConfig, TrainConfig, load_params, setup_entry_point
from pipelines.lineage import base_model_info, dvc_hash, git_commit
from pipelines.model import devices, loop
from pipelines.model.batches import TrainData, prepare_examples
from pipelines.model.loop import History, Trainable, build_model_and_optimizer, train_loop
from pipelines.tracking import configure_mlflow

log = logging.getLogger(__name__)


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
    where = devices.place(cfg)
    procs = where.procs
    if not procs.is_main:  # rank 0 reports
        log.setLevel(logging.WARNING)
        loop.log.setLevel(logging.WARNING)
    net = build_model_and_optimizer(cfg, base_dir, where.device)
    data = prepare_examples(cfg, seed, prepared_dir, net.tok)
    data_hash, base = dvc_hash(prepared_dir), base_model_info(base_dir)
    fingerprint = json.dumps([cfg.model_dump(mode="json"), seed, data_hash, base], sort_keys=True)
    if procs.sharded:
        log.warning("no resumable checkpoints under FSDP/DeepSpeed: no rank holds all state")
    state = None if procs.sharded else _load_checkpoint(checkpoint_dir, fingerprint)
    history = _resume(net, state, cfg.max_steps) if state else History()
    net.loss_module, net.optim = procs.prepare(net.loss_module, net.optim, cfg.batch_size)

    run_name = f"lora-r{cfg.lora_r}-a{cfg.lora_alpha}-{data_hash.removeprefix('sha256:')[:8]}"
    resumed_run = state["run_id"] if state else None
    with _tracking(mlflow_cfg, procs.is_main, resumed_run, run_name) as run_id:
        if procs.is_main and not state:
            _log_run_start(cfg, seed, data, net, procs.world, data_hash, base)
        log.info(
            "training %d examples (%d dropped > %d tokens), %d trainable params, %dx%s %s, run %s",
            len(data.examples),
            data.dropped,
            cfg.max_length,
            sum(p.numel() for p in net.params),
            procs.world,
            where.device,
            where.autocast_dtype or "fp32",
            run_id,
        )
        metrics = _log_metrics if procs.is_main else loop.untracked
        save = functools.partial(_checkpoint, checkpoint_dir, net, procs, run_id, fingerprint)
        history = train_loop(
            cfg, net, data, where, history, metrics, None if procs.sharded else save
        )
        gathered = procs.gathered_state(net.loss_module)
        if not procs.is_main:
            procs.wait()  # until rank 0 has saved
            procs.end()
            return None
        _save_adapter(net.model, net.tok, adapter_dir, gathered)
        info = _train_info(cfg, run_id, history, data, where, net.fused, data_hash, base)
        (adapter_dir / "train_info.json").write_text(json.dumps(info, indent=2))
        mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
        mlflow.log_metrics({"final_loss": info["final_loss"], "train_seconds": info["seconds"]})
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    log.info(
        "adapter saved to %s after %d steps in %.0f s", adapter_dir, history.step, info["seconds"]
    )
    procs.wait()
    procs.end()
    return info


def _resume(net: Trainable, state: dict, max_steps: int) -> History:
    """Adapter, optimizer and schedule as a checkpoint left them; the history so far."""
    set_peft_model_state_dict(net.model, state["adapter"])
    net.optim.load_state_dict(state["optimizer"])
    net.sched.load_state_dict(state["scheduler"])
    log.info("resuming from checkpoint at step %d/%d", state["step"], max_steps)
    return History(
        step=state["step"],
        losses=state["history"],
        eval_losses=state["dev_history"],
        resumed_at=state["step"],
    )


@contextlib.contextmanager
def _tracking(
    mlflow_cfg: MlflowConfig, is_main: bool, run_id: str | None, run_name: str
) -> Iterator[str | None]:
    """Rank 0's MLflow run (a resumed run continues its curves); other ranks track nothing."""
    if not is_main:
        yield None
        return
    configure_mlflow(mlflow_cfg)
    name = None if run_id else run_name
    with mlflow.start_run(run_id=run_id, run_name=name, log_system_metrics=True) as active:
        yield active.info.run_id


def _log_metrics(metrics: dict[str, float], step: int) -> None:
    mlflow.log_metrics(metrics, step=step)


def _log_run_start(
    cfg: TrainConfig,
    seed: int,
    data: TrainData,
    net: Trainable,
    world: int,
    data_hash: str,
    base: dict,
) -> None:
    """Params and lineage tags of a new run."""
    mlflow.log_params({**cfg.model_dump(mode="json"), "seed": seed})
    mlflow.log_params(
        {
            "n_train": len(data.examples),
            "n_dev": len(data.dev),
            "dropped_too_long": data.dropped,
            "trainable": sum(p.numel() for p in net.params),
            "processes": world,
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


def _train_info(
    cfg: TrainConfig,
    run_id: str,
    history: History,
    data: TrainData,
    where: devices.Placement,
    fused: bool,
    data_hash: str,
    base: dict,
) -> dict:
    """train_info.json: the run's figures and how it ran."""
    losses = history.losses
    return {
        "run_id": run_id,
        "steps": history.step,
        "final_loss": losses[-1] if losses else None,
        "loss_first_10": sum(losses[:10]) / max(1, len(losses[:10])),
        "loss_last_10": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "eval_loss": history.eval_losses[-1] if history.eval_losses else None,
        "early_stopped": history.step < history.planned_steps,
        "planned_steps": history.planned_steps,  # < max_steps: max_minutes did not fit them
        "seconds": history.seconds,
        "tokens_per_s": history.tokens_per_s,
        "s_per_step": history.seconds / max(1, history.step - history.resumed_at),
        "n_train": len(data.examples),
        "data_hash": data_hash,
        "base_model": base["id"],
        "base_model_hash": base["weights_sha256"],
        "precision": str(where.autocast_dtype or "fp32"),
        "device": where.device.type,
        "processes": where.procs.world,
        "optimizer": "adamw_fused" if fused else "adamw",
        "shared_prefix": where.share_prefix,
        "quantization": cfg.quantization,
    }


def _save_adapter(model, tok, adapter_dir: Path, gathered: dict | None) -> None:
    """The LoRA weights + tokenizer; from the state gathered across ranks where sharded."""
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    state = None
    if gathered is not None:  # keys of the CompletionLoss wrapper: "model.<peft key>"
        state = {k.removeprefix("model."): v for k, v in gathered.items()}
    model.save_pretrained(adapter_dir, state_dict=state)
    tok.save_pretrained(adapter_dir)


def _checkpoint(
    path: Path,
    net: Trainable,
    procs: devices.Processes,
    run_id: str | None,
    fingerprint: str,
    history: History,
) -> None:
    """Rank 0 saves (under DDP every rank holds the same adapter and optimizer); all wait."""
    if procs.is_main:
        progress = {"step": history.step, "history": history.losses}
        progress["dev_history"] = history.eval_losses
        _save_checkpoint(path, net.model, net.optim, net.sched, progress, run_id, fingerprint)
    procs.wait()


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
