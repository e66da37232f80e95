"""`make bench`: sqlops against a baseline, both measured in the same run on the same inputs.

    python -m pipelines.bench train        training tokens/s: sqlops step vs a naive LoRA step
    python -m pipelines.bench generation   generation tokens/s: the backend sqlops picks
                                           vs transformers batched (batch 16, fp32)
    python -m pipelines.bench grammar      ms per decoding step with the schema grammar's
                                           vocabulary mask vs without (bench/grammar.py)
    python -m pipelines.bench serving      seconds/request through the gateway vs vLLM directly,
                                           then a hot swap under load (bench/loadtest.py)

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
from peft import get_peft_model

from pipelines.bench.grammar import bench_grammar
from pipelines.config import Params, load_params, setup_entry_point
from pipelines.data.records import read_jsonl, sample_records
from pipelines.model import backends, batches, devices
from pipelines.model.base import load_base
from pipelines.model.decoding import GREEDY
from pipelines.model.generate import generate_sql
from pipelines.model.loss import completion_loss
from pipelines.model.prompt import STOP, build_prompt
from pipelines.sql import extract_sql
from pipelines.vllm_runtime import VLLMRuntime

log = logging.getLogger(__name__)


def _write(p: Params, name: str, result: dict) -> Path:
    p.path("bench").mkdir(parents=True, exist_ok=True)
    out = p.path("bench") / f"{name}.json"
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
    model = get_peft_model(model, devices.lora_config(cfg, model))
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
        p,
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


@torch.inference_mode()
def _plain_batched(model, tok, prompts: list[str], batch_size: int, max_new_tokens: int):
    """The baseline: transformers `generate` on batches in the given order, left padding, KV
    cache, greedy, stop at `;`. Returns (texts, new tokens, seconds)."""
    tok.padding_side = "left"
    texts, new_tokens, start = [], 0, time.monotonic()
    for b in range(0, len(prompts), batch_size):
        enc = tok(prompts[b : b + batch_size], return_tensors="pt", padding=True,
                  add_special_tokens=False)  # fmt: skip
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             stop_strings=STOP, tokenizer=tok,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
        gen = out[:, enc.input_ids.shape[1] :]
        new_tokens += int((gen != tok.pad_token_id).sum())
        texts += tok.batch_decode(gen, skip_special_tokens=True)
    return texts, new_tokens, time.monotonic() - start


def bench_generation(p: Params, n_prompts: int = 64, max_new_tokens: int = 64) -> Path:
    """The same eval prompts and budget through sqlops' generation path (the backend
    `evaluate.backend` picks; with vLLM the tuned adapter merged into the base weights, or the
    base weights when no adapter is trained) and through plain transformers batched
    generation (batch 16, fp32, the adapter merged in memory), in this one run."""
    cfg = p.evaluate.model_copy(update={"max_new_tokens": max_new_tokens})
    adapter = p.path("adapter")
    has_adapter = (adapter / "adapter_model.safetensors").is_file()
    spec = backends.ModelSpec(p.path("base_model"), adapter if has_adapter else None)
    records = sample_records(read_jsonl(p.path("prepared") / "eval.jsonl"), n_prompts, p.seed)
    tok = backends.load_tokenizer(spec.base_dir)
    prompts = [build_prompt(r["ddl"], r["question"], tok) for r in records]

    start = time.monotonic()
    model, _ = load_base(spec.base_dir, spec.adapter_dir)
    base_texts, base_tokens, base_s = _plain_batched(model, tok, prompts, 16, max_new_tokens)
    base_total = time.monotonic() - start
    # sqlops' own transformers path (the fallback backend): shared-prefix batches, fp32.
    own = generate_sql(model, tok, prompts, 16, max_new_tokens)
    del model
    base_sql = [extract_sql(t) for t in base_texts]

    start = time.monotonic()
    gen = backends.generate(spec, tok, prompts, cfg, VLLMRuntime.of(p), GREEDY)
    total = time.monotonic() - start  # merge (first time) + engine start-up + generation
    same = sum(a == b for a, b in zip(gen.sql, base_sql, strict=True)) / len(prompts)
    return _write(
        p,
        "generation",
        {
            "metric": "generation tokens per second",
            "unit": "tokens/s",
            "sqlops": gen.tokens_per_s,
            "baseline": base_tokens / base_s,
            "baseline_name": "transformers batched generate (batch 16, left padding, KV cache, "
            "fp32, greedy, stop at ';')",
            "ratio": gen.tokens_per_s / (base_tokens / base_s),
            "setup": {
                "model": p.base_model.id,
                "weights": "tuned adapter merged into the base weights"
                if has_adapter
                else "base weights (no adapter at paths.adapter)",
                "sqlops_backend": gen.backend,
                "sqlops_precision": "bf16" if gen.backend == "vllm" else "fp32",
                "vllm_max_num_seqs": cfg.vllm_max_num_seqs if gen.backend == "vllm" else None,
                "prompts": len(prompts),
                "max_new_tokens": max_new_tokens,
                "mean_prompt_tokens": sum(
                    len(tok(x, add_special_tokens=False).input_ids) for x in prompts
                )
                / len(prompts),
                "new_tokens": {"sqlops": gen.new_tokens, "baseline": base_tokens},
                "generation_seconds": {"sqlops": gen.seconds, "baseline": base_s},
                # Start-up counted too: model load, merge (once per adapter), vLLM engine.
                "end_to_end_seconds": {"sqlops": total, "baseline": base_total},
                "vllm_engine_start_seconds": gen.load_seconds,
                "transformers_shared_prefix_tokens_per_s": own.tokens_per_s,
                "same_sql_share": same,  # bf16 vs fp32 greedy may part ways on a few prompts
                "threads": torch.get_num_threads(),
                "machine": platform.processor() or platform.machine(),
            },
        },
    )


def bench_serving(p: Params, **load) -> dict | None:
    """Gateway vs direct vLLM and the hot swap (`loadtest.run`, `load` = its sizes), with vLLM +
    gateway started for it when not already up; None, with the reason logged, when skipped."""
    from pipelines.bench import loadtest

    reason = loadtest.cannot_run(p)
    if reason is not None:
        log.warning("serving bench skipped: %s", reason)
        return None
    with loadtest.serving_up(p):
        return loadtest.run(p, **load)


def main() -> None:
    setup_entry_point()
    parser = argparse.ArgumentParser(description=__doc__)
    benches = {
        "train": bench_train,
        "generation": bench_generation,
        "grammar": lambda p: _write(p, "grammar", bench_grammar(p)),
        "serving": bench_serving,
    }
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
