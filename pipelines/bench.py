"""`make bench`: sqlops against a baseline, both measured in the same run on the same inputs.

    python -m pipelines.bench train    training tokens/s: sqlops step vs a naive LoRA step
    python -m pipelines.bench serving  seconds/request through the gateway vs vLLM directly,
                                       then a hot swap under load (pipelines/serving/loadtest.py)

Each comparison writes `reports/bench/<name>.json` in the output contract of DESIGN.md:
`{metric, unit, sqlops, baseline, baseline_name, ratio, setup}`; `serving` writes
`reports/bench/gateway.json` and `reports/hot_swap.json`. `serving` needs a champion in the
registry: without one it says so and is skipped (exit code 0), so `make bench` on a checkout
that never ran `make run` still gives the training figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from pipelines.config import ROOT, Params, load_params, setup_entry_point
from pipelines.data.records import read_jsonl
from pipelines.model import batches, devices
from pipelines.model.base import load_base
from pipelines.model.loss import completion_loss

log = logging.getLogger(__name__)
BENCH_DIR = ROOT / "reports" / "bench"


def _write(name: str, result: dict) -> Path:
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    out = BENCH_DIR / f"{name}.json"
    out.write_text(json.dumps(result, indent=2))
    log.info(
        "%s: sqlops %.1f vs %s %.1f %s (ratio %.2f) -> %s",
        result["metric"],
        result["sqlops"],
        result["baseline_name"],
        result["baseline"],
        result["unit"],
        result["ratio"],
        out,
    )
    return out


def _time_steps(model, batch, steps: int, step_fn) -> float:
    """Seconds per optimizer step (forward + backward + AdamW), after one warm-up step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-5)
    times = []
    cuda = next(model.parameters()).is_cuda
    for i in range(steps + 1):
        start = time.perf_counter()
        loss = step_fn(model, batch)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        if cuda:  # kernels run asynchronously: the step ends when the GPU is done
            torch.cuda.synchronize()
        if i:  # the first step pays for allocation and kernel selection
            times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def bench_train(p: Params, steps: int | None = None) -> Path:
    """Same model, LoRA config, 8 training examples, on the device training would use: a naive
    step (fp32, logits at every position, batch padded to its longest member) vs the sqlops
    step (bf16 autocast where chosen, shared prefix once, logits only at SQL positions)."""
    cfg = p.train
    device, dtype = devices.pick_device(cfg.precision)
    steps = steps or (20 if device.type == "cuda" else 3)
    model, tok = load_base(p.path("base_model"))
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    # One training batch as the schedule builds it: examples of one database.
    records = read_jsonl(p.path("prepared") / "train.jsonl")
    records = [r for r in records if r["db_id"] == records[0]["db_id"]][: cfg.batch_size]
    examples, _, _ = batches.tokenize(records, tok, cfg.max_length)
    batch = batches.collate(examples, tok.pad_token_id)
    n_tokens = int(batch["attention_mask"].sum())
    model.to(device)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def naive(m, b):
        # Every sequence in full, logits at every position, fp32: what model(labels=...) does.
        return m(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]
        ).loss

    def sqlops(m, b):
        ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            return completion_loss(m, b)[0]

    share = devices.shares_prefix(cfg.shared_prefix, device)
    unshared = {**batch, "prefix_len": torch.zeros_like(batch["prefix_len"])}
    naive_s = _time_steps(model, batch, steps, naive)
    sqlops_s = _time_steps(model, batch if share else unshared, steps, sqlops)
    # The road not taken by `train.shared_prefix`, for the record.
    other_s = _time_steps(model, unshared if share else batch, steps, sqlops)
    return _write(
        "train",
        {
            "metric": "training tokens per second",
            "unit": "tokens/s",
            "sqlops": n_tokens / sqlops_s,
            "baseline": n_tokens / naive_s,
            "baseline_name": "naive LoRA step (fp32, every sequence in full, full logits)",
            "ratio": naive_s / sqlops_s,
            "setup": {
                "model": p.base_model.id,
                "lora_r": cfg.lora_r,
                "target_modules": cfg.target_modules,
                "batch_size": len(examples),
                "tokens_in_batch": n_tokens,
                "padded_length": int(batch["input_ids"].shape[1]),
                "sql_tokens": int((batch["labels"] != batches.IGNORE).sum()),
                "shared_prefix_tokens": int(batch["prefix_len"]),
                "sqlops_precision": str(dtype or "fp32"),
                "timed_steps": steps,
                "shared_prefix": share,
                "s_per_step": {
                    "sqlops": sqlops_s,
                    "naive": naive_s,
                    f"sqlops_with_shared_prefix_{'off' if share else 'on'}": other_s,
                },
                "threads": torch.get_num_threads(),
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "machine": platform.processor() or platform.machine(),
            },
        },
    )


def bench_serving(p: Params, out: Path = BENCH_DIR.parent, **load) -> dict | None:
    """Gateway vs direct vLLM and the hot swap (`loadtest.run`, `load` = its sizes), with vLLM +
    gateway started for it when not already up; None, with the reason logged, when skipped."""
    from pipelines.serving import loadtest

    reason = loadtest.cannot_run(p)
    if reason is not None:
        log.warning("serving bench skipped: %s", reason)
        return None
    with loadtest.serving_up(p):
        return loadtest.run(p, out, **load)


def main() -> None:
    setup_entry_point()
    parser = argparse.ArgumentParser(description=__doc__)
    benches = {"train": bench_train, "serving": bench_serving}
    parser.add_argument("name", nargs="*", help=f"one or more of {sorted(benches)} (default: all)")
    args = parser.parse_args()
    unknown = set(args.name) - set(benches)
    if unknown:
        parser.error(f"unknown bench {sorted(unknown)}; choose from {sorted(benches)}")
    p = load_params()
    for name in args.name or list(benches):
        benches[name](p)


if __name__ == "__main__":
    main()
