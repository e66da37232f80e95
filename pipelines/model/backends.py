"""One generation interface, two backends: offline vLLM when it is installed, transformers else.

`generate(spec, tok, prompts, cfg, vllm, decoding, grammars)` returns a `Generation` (raw
texts, extracted SQL, every prompt's candidates, tokens, seconds) whichever backend ran;
`evaluate`, `sqlops eval`, the experiments and `make bench` all call it, and the candidates
go through `pipelines.model.decoding.choose` (as the gateway's do). `evaluate.backend` picks:

- `vllm`: `.venv-vllm/bin/python pipelines/model/vllm_offline.py` in a subprocess (vLLM's pins
  conflict with this venv's), on the adapter merged into the base weights
  (`pipelines.model.merge`; on CPU vLLM runs plain weights ~3.4x faster than base + LoRA), in
  bf16 where the hardware has it and fp32 elsewhere (`vllm.dtype`, `devices.vllm_dtype`);
- `transformers`: `pipelines.model.generate` in this process (greedy: batched, left padding,
  shared-prefix KV cache; candidates or a grammar: per prompt, xgrammar's logits processor);
- `auto`: the one expected to finish first for this many tokens: vLLM's engine start-up plus
  tokens at its speed for the dtype it gets here, against transformers' speed: the figures the
  last generations measured on this machine (`<paths.run_dir>/generation_speed.json`), else
  `evaluate.speed`'s; if the vLLM run fails, a warning and transformers.

Both backends get the same token ids and the same requests (`decoding.engine_requests`), stop
after the first `;` or at end of turn, and their output goes through the same `extract_sql`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

from pipelines.config import ROOT, DecodingConfig, EvaluateConfig
from pipelines.data.atomic import aside
from pipelines.model.decoding import Candidate, engine_requests
from pipelines.model.devices import vllm_dtype
from pipelines.model.generate import Generation, generate_candidates, generate_sql
from pipelines.model.merge import merged_model_dir
from pipelines.vllm_runtime import VLLMRuntime

log = logging.getLogger(__name__)
VLLM_SCRIPT = Path(__file__).with_name("vllm_offline.py")
_vllm_failed: list[str] = []  # a failure in this process: `auto` does not try vLLM again
SPEED_FILE = "generation_speed.json"  # in paths.run_dir: speeds measured on this machine
MIN_MEASURED_TOKENS = 1000  # smaller generations (tests, smoke checks) are not kept as figures


@dataclass(frozen=True)
class ModelSpec:
    """What to generate with: base weights, optionally with a LoRA adapter applied."""

    base_dir: Path
    adapter_dir: Path | None = None

    def vllm_model_dir(self, merged_root: Path) -> Path:
        """The weights vLLM loads: the base, or the adapter merged into it (cached)."""
        if self.adapter_dir is None:
            return self.base_dir
        return merged_model_dir(self.base_dir, self.adapter_dir, merged_root)


def load_tokenizer(base_dir: Path):
    """The tokenizer both backends use (pad = eos where the model has no pad token)."""
    tok = AutoTokenizer.from_pretrained(base_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def vllm_problem(vllm: VLLMRuntime) -> str | None:
    """Why offline vLLM cannot run here (None when it can)."""
    if problem := vllm.problem():
        return problem
    if _vllm_failed:
        return f"vLLM failed earlier in this process ({_vllm_failed[-1]})"
    return None


def speed_keys(base_dir: Path, dtype: str, batched: bool) -> dict[str, str]:
    """The names a backend's measured speed is kept under (`SPEED_FILE`): per base model, vLLM
    by dtype, transformers by path (batched greedy, or one prompt at a time for candidates or
    a grammar)."""
    model, path = Path(base_dir).resolve(), "batched" if batched else "per-prompt"
    return {"vllm": f"{model} vllm-{dtype}", "transformers": f"{model} transformers-{path}"}


def measured_speeds(run_dir: Path) -> dict[str, dict]:
    """Speeds measured by earlier generations on this machine (`SPEED_FILE`; {} when none)."""
    try:
        return json.loads((run_dir / SPEED_FILE).read_text())
    except (OSError, ValueError):
        return {}


def record_speed(run_dir: Path, key: str, gen: Generation) -> None:
    """Keep a generation's speed (and engine start-up) for `auto`'s next choice on this machine;
    runs under MIN_MEASURED_TOKENS tokens say little and are not kept."""
    if gen.new_tokens < MIN_MEASURED_TOKENS or gen.seconds <= 0:
        return
    speeds = measured_speeds(run_dir)
    speeds[key] = {"tok_s": round(gen.tokens_per_s, 1), "start_s": round(gen.load_seconds, 1),
                   "tokens": gen.new_tokens}  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = aside(run_dir / SPEED_FILE)
    tmp.write_text(json.dumps(speeds, indent=1, sort_keys=True))
    os.replace(tmp, run_dir / SPEED_FILE)


def expected_seconds(
    cfg: EvaluateConfig, n_tokens: int, dtype: str, measured: dict[str, dict] | None = None
) -> dict[str, float]:
    """Expected wall time per backend for `n_tokens` generated tokens: from `measured` (this
    machine's figures, per backend, see `speed_keys`) where present, else `evaluate.speed`;
    vLLM in fp32 runs at its fp32 figure (a machine without native bf16)."""
    s, measured = cfg.speed, measured or {}
    vllm = measured.get("vllm") or {
        "start_s": s.vllm_start_s,
        "tok_s": s.vllm_tok_s if dtype == "bfloat16" else s.vllm_fp32_tok_s,
    }
    transformers = measured.get("transformers") or {"tok_s": s.transformers_tok_s}
    return {
        "vllm": vllm["start_s"] + n_tokens / vllm["tok_s"],
        "transformers": n_tokens / transformers["tok_s"],
    }


def pick_backend(
    cfg: EvaluateConfig,
    n_tokens: int,
    problem: str | None,
    dtype: str = "bfloat16",
    measured: dict[str, dict] | None = None,
) -> tuple[str, str]:
    """(backend, the reason, for the log); `problem` is what `vllm_problem()` says, `n_tokens`
    the tokens expected (prompts x candidates x `speed.tokens_per_candidate`), `measured` this
    machine's speeds per backend (`expected_seconds`)."""
    if cfg.backend == "transformers":
        return "transformers", "evaluate.backend is transformers"
    if cfg.backend == "vllm":
        if problem:
            raise RuntimeError(f"evaluate.backend is vllm, but {problem}")
        return "vllm", "evaluate.backend is vllm"
    if problem:
        return "transformers", problem
    t = expected_seconds(cfg, n_tokens, dtype, measured)
    source = ", ".join(f"{k}: {'measured here' if k in (measured or {}) else 'evaluate.speed'}"
                       for k in ("vllm", "transformers"))  # fmt: skip
    figures = f"~{n_tokens} tokens: vLLM {dtype} ~{t['vllm']:.0f} s incl. start-up, " \
        f"transformers ~{t['transformers']:.0f} s ({source})"  # fmt: skip
    if t["vllm"] < t["transformers"]:
        return "vllm", f"expected faster: {figures}"
    return "transformers", f"expected faster: {figures}"


def generate_vllm(
    model_dir: Path, requests: list[dict], cfg: EvaluateConfig, vllm: VLLMRuntime
) -> dict:
    """Run vllm_offline.py on engine requests (`decoding.engine_requests`); its result dict
    (raises when it fails)."""
    request = {
        "model": str(model_dir),
        "dtype": vllm_dtype(vllm.dtype),
        "max_model_len": vllm.max_model_len,
        "max_num_seqs": cfg.vllm_max_num_seqs,
        "enforce_eager": vllm.enforce_eager,
        "requests": requests,
    }
    vllm.run_dir.mkdir(parents=True, exist_ok=True)
    out = vllm.run_dir / "vllm-offline.log"  # the last run's vLLM output, kept for a look
    with tempfile.TemporaryDirectory(prefix="sqlops-vllm-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        cmd = [str(vllm.python), str(VLLM_SCRIPT), str(req), str(res)]
        with out.open("wb") as log_file:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=vllm.env(), stdout=log_file,
                stderr=subprocess.STDOUT, timeout=cfg.vllm_timeout_s, check=False,
            )  # fmt: skip
        if proc.returncode != 0 or not res.is_file():
            tail = out.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"vLLM exited with {proc.returncode} (log: {out}):\n{tail}")
        return json.loads(res.read_text())


def generate(
    spec: ModelSpec,
    tok,
    prompts: list[str],
    cfg: EvaluateConfig,
    vllm: VLLMRuntime,
    decoding: DecodingConfig,
    grammars: list[str | None] | None = None,
) -> Generation:
    """Every prompt's candidates (`decoding`; `grammars`: one per prompt, or None) from the
    backend `evaluate.backend` picks; `texts`/`sql` hold the first (greedy) candidate's."""
    grammars = grammars or [None] * len(prompts)
    dtype = vllm_dtype(vllm.dtype)
    n_tokens = len(prompts) * decoding.n * cfg.speed.tokens_per_candidate
    batched = decoding.n == 1 and not any(grammars)  # transformers' batched path
    keys = speed_keys(spec.base_dir, dtype, batched)
    speeds = measured_speeds(vllm.run_dir)
    measured = {b: speeds[k] for b, k in keys.items() if k in speeds}
    problem = vllm_problem(vllm)
    backend, why = pick_backend(cfg, n_tokens, problem, dtype, measured)
    if problem and backend == "transformers":
        # The slow path says how to get the fast one (a fresh clone's `make run` builds it).
        t = expected_seconds(cfg, n_tokens, dtype, measured)
        log.warning(
            "generation backend: transformers, ~%.0f s expected vs ~%.0f s on vLLM: %s",
            t["transformers"], t["vllm"], why,
        )  # fmt: skip
    else:
        log.info("generation backend: %s (%s)", backend, why)
    if backend == "vllm":
        token_ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
        per_prompt = [
            engine_requests(ids, g, decoding, cfg.max_new_tokens)
            for ids, g in zip(token_ids, grammars, strict=True)
        ]
        flat = [r for reqs in per_prompt for r in reqs]
        try:
            out = generate_vllm(spec.vllm_model_dir(vllm.merged_root), flat, cfg, vllm)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            if cfg.backend == "vllm":
                raise
            _vllm_failed.append(str(e).splitlines()[0])
            log.warning("vLLM generation failed, falling back to transformers: %s", e)
        else:
            outputs, candidates = iter(out["outputs"]), []
            for reqs in per_prompt:
                cands = [Candidate(o["text"], o["logprob"], o["tokens"])
                         for _ in reqs for o in next(outputs)]  # fmt: skip
                candidates.append(cands)
            result = Generation.from_candidates(candidates, out["seconds"], "vllm")
            log.info(
                "generated %d prompts x %d candidates, %d tokens in %.1f s (%.0f tok/s; vLLM %s "
                "%s, engine start-up %.1f s)", len(prompts), decoding.n, result.new_tokens,
                result.seconds, result.tokens_per_s, out["vllm_version"], dtype,
                out["load_seconds"],
            )  # fmt: skip
            result.load_seconds = out["load_seconds"]
            record_speed(vllm.run_dir, keys["vllm"], result)
            return result
    from pipelines.model.base import load_base

    model, _ = load_base(spec.base_dir, spec.adapter_dir)
    if batched:
        result = generate_sql(model, tok, prompts, cfg.batch_size, cfg.max_new_tokens)
    else:
        result = generate_candidates(model, tok, prompts, grammars, decoding, cfg.max_new_tokens)
    record_speed(vllm.run_dir, keys["transformers"], result)
    return result
