"""What the `train` stage trains and the loop that trains it.

`build_model_and_optimizer` puts fresh LoRA adapters on the base model and sets up AdamW with
its warmup/decay schedule (a `Trainable`). `train_loop` runs the optimizer steps over a
`batches.TrainData` on a `devices.Placement`: micro-batches, gradient sync and clipping, train
and eval metrics, early stopping, periodic checkpoints. It extends a `History` (fresh or
restored from a checkpoint) and returns it; tracking and checkpoint files are callbacks, so
the loop runs alone in a test. `pipelines.model.train` wires these into the stage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import get_peft_model

from pipelines.config import TrainConfig
from pipelines.model import devices
from pipelines.model.batches import Example, TrainData, collate
from pipelines.model.loss import CompletionLoss, eval_loss

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def should_stop(dev_history: list[float], patience: int) -> bool:
    """Early stopping: the last `patience` evals all failed to beat the best before them."""
    if patience <= 0 or len(dev_history) <= patience:
        return False
    return min(dev_history[-patience:]) >= min(dev_history[:-patience])


@dataclass
class StepPlan:
    """How many optimizer steps the run takes: `max_steps`, or fewer once `max_minutes` has been
    measured not to fit them. The learning-rate schedule reads it, so it decays to 0 at the
    planned last step whichever that is."""

    steps: int


@dataclass
class Trainable:
    """The model being trained and what updates it."""

    model: torch.nn.Module  # the base model with LoRA adapters (peft)
    tok: PreTrainedTokenizerBase
    params: list[torch.nn.Parameter]  # the LoRA weights: optimized, clipped, counted
    optim: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    loss_module: torch.nn.Module  # CompletionLoss(model); accelerate wraps it when launched
    fused: bool  # AdamW's fused kernel (CUDA)
    plan: StepPlan  # the steps the schedule decays over (train_loop shrinks it to the budget)


def lr_lambda(cfg: TrainConfig, plan: StepPlan) -> Callable[[int], float]:
    """The learning-rate factor of a step: linear warmup, then linear decay to 0 at the plan's
    last step (warmup is a share of the planned steps)."""

    def factor(step: int) -> float:
        warmup = max(1, int(plan.steps * cfg.warmup_ratio))
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (plan.steps - step) / max(1, plan.steps - warmup))

    return factor


def steps_in_budget(
    cfg: TrainConfig, step: int, done: int, elapsed_s: float, measured_s: float
) -> int:
    """The last step a run can reach within `max_minutes`, at `step` after this process did
    `done` steps in `elapsed_s` seconds, of which the steps after its first took `measured_s`
    (the first one warms caches and is not typical). Re-estimated after every step, so one
    slow step early on (another process on the cores) does not cut the run for good. Never
    beyond `max_steps`, never before `step` (over budget: stop now); `max_steps` until three
    steps are measured."""
    if cfg.max_minutes <= 0 or done < 4:
        return cfg.max_steps
    per_step = measured_s / (done - 1)
    left = cfg.max_minutes * 60 - elapsed_s
    return max(step, min(cfg.max_steps, step + int(left // per_step)))


def build_model_and_optimizer(cfg: TrainConfig, base_dir: Path, device: torch.device) -> Trainable:
    """The base model with fresh LoRA adapters on `device`, AdamW and the warmup/decay schedule."""
    model, tok = devices.load_for_training(base_dir, cfg.quantization, device)
    model = get_peft_model(model, devices.lora_config(cfg, model))
    if cfg.quantization == "none":  # 4-bit weights were loaded onto the device
        model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"  # one kernel for all parameters instead of one per tensor
    optim = torch.optim.AdamW(
        params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused
    )
    plan = StepPlan(cfg.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(cfg, plan))
    return Trainable(model, tok, params, optim, sched, CompletionLoss(model), fused, plan)


@dataclass
class History:
    """How far training got: restored from a checkpoint, extended by `train_loop`."""

    step: int = 0  # optimizer steps done
    losses: list[float] = field(default_factory=list)  # train loss of every step
    eval_losses: list[float] = field(default_factory=list)  # dev loss of every evaluation
    resumed_at: int = 0  # the step this process started from (a checkpoint's)
    tokens: int = 0  # example tokens this process trained on
    seconds: float = 0.0  # this process's time in the loop
    planned_steps: int = 0  # the plan's last step when the loop ended (max_steps or the budget's)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def untracked(metrics: dict[str, float], step: int) -> None:
    """Where metrics go on ranks other than 0 and in tests: nowhere."""


def train_loop(
    cfg: TrainConfig,
    net: Trainable,
    data: TrainData,
    where: devices.Placement,
    history: History,
    log_metrics: Callable[[dict[str, float], int], None] = untracked,
    checkpoint: Callable[[History], None] | None = None,
) -> History:
    """Optimizer steps from `history.step` to the plan's last step (`cfg.max_steps`, fewer when
    `cfg.max_minutes` does not fit them) or an early stop. Train metrics go to `log_metrics`
    every `log_every` steps, the dev loss every `eval_every` and at the last step; `checkpoint`
    is called every `checkpoint_every` steps. Returns `history`, extended."""
    net.loss_module.train()
    plan = net.plan
    start = time.monotonic()
    window_start, window_tokens = start, 0
    first_done = None  # when this process's first step ended (the budget's estimate starts there)
    while history.step < plan.steps:
        if should_stop(history.eval_losses, cfg.early_stopping_patience):
            break
        loss, grad_norm, n_tokens = _optimizer_step(cfg, net, data, where, history.step)
        history.step += 1
        history.losses.append(loss)
        history.tokens += n_tokens
        window_tokens += n_tokens
        step = history.step
        now = time.monotonic()
        first_done = first_done or now
        if cfg.max_minutes > 0:
            done_here = step - history.resumed_at
            fit = steps_in_budget(cfg, step, done_here, now - start, now - first_done)
            # Every rank takes the same number of steps: they average their estimates.
            fit = int(where.procs.mean(float(fit)))
            if abs(fit - plan.steps) >= max(5, plan.steps // 10):  # log the moves that matter
                per_step = (now - first_done) / max(1, done_here - 1)
                msg = "max_minutes %.1f fits %d of %d steps (%.1f s/step): the schedule ends there"
                log.info(msg, cfg.max_minutes, fit, cfg.max_steps, per_step)
            plan.steps = fit
        if step % cfg.log_every == 0 or step == plan.steps:
            tps = window_tokens / max(now - window_start, 1e-9)
            window_start, window_tokens = now, 0
            lr = net.sched.get_last_lr()[0]
            metrics = {"train_loss": loss, "learning_rate": lr, "grad_norm": grad_norm}
            log_metrics({**metrics, "tokens_per_s": tps}, step)
            msg = "step %d/%d loss %.4f lr %.2e grad %.2f %.0f tok/s"
            log.info(msg, step, plan.steps, loss, lr, grad_norm, tps)
        if data.dev and (step % cfg.eval_every == 0 or step == plan.steps):
            with where.autocast():
                dev_batches = [_batch(data.dev, b, net.tok, where) for b in data.dev_batches]
                dev_loss = eval_loss(net.loss_module, dev_batches)
            dev_loss = where.procs.mean(dev_loss)  # one value on every rank: they stop together
            history.eval_losses.append(dev_loss)
            log_metrics({"eval_loss": dev_loss}, step)
            msg = "step %d/%d eval loss %.4f (%d dev examples)"
            log.info(msg, step, plan.steps, dev_loss, len(data.dev))
        if checkpoint and step % cfg.checkpoint_every == 0 and step < plan.steps:
            checkpoint(history)
    history.planned_steps = plan.steps
    history.seconds = time.monotonic() - start
    return history


def _optimizer_step(
    cfg: TrainConfig, net: Trainable, data: TrainData, where: devices.Placement, step: int
) -> tuple[float, float, int]:
    """Optimizer step `step` over its `grad_accum` micro-batches: (the global batch's loss, the
    gradient norm before clipping, the example tokens trained on)."""
    procs, examples = where.procs, data.examples
    loss_sum, n_tokens = 0.0, 0
    for micro in range(cfg.grad_accum):
        idxs = data.schedule[step * cfg.grad_accum + micro]
        mine, weight = procs.shard(idxs)
        batch = _batch(examples, mine, net.tok, where)
        with procs.micro_step(net.loss_module):
            with where.autocast():
                loss, n = net.loss_module(batch)
            # This rank's part of the global batch's mean over its SQL tokens (1 with one
            # process); the all-reduce averages ranks, hence the `world` factor.
            n_sql = sum(len(examples[i].input_ids) - examples[i].n_prompt for i in idxs)
            share = weight * n / n_sql
            procs.backward(loss * (share * procs.world) if procs.world > 1 else loss)
        loss_sum += loss.item() * share / cfg.grad_accum
        # Example tokens trained on (as in `make bench`), not the fewer ones computed.
        n_tokens += sum(len(examples[i].input_ids) for i in idxs)
    loss_sum = procs.sum(loss_sum)
    grad_norm = procs.clip_grad_norm(net.loss_module, net.params, cfg.grad_clip)
    net.optim.step()
    net.sched.step()
    net.optim.zero_grad(set_to_none=True)
    return loss_sum, grad_norm, n_tokens


def _batch(
    pool: list[Example], idxs: list[int], tok: PreTrainedTokenizerBase, where: devices.Placement
) -> dict[str, torch.Tensor]:
    batch = collate([pool[i] for i in idxs], tok.pad_token_id, where.share_prefix)
    return {k: v.to(where.device) for k, v in batch.items()}
