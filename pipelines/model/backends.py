"""One generation interface, two backends: offline vLLM when it is installed, transformers else.

`generate(spec, tok, prompts, cfg, vllm)` returns a `Generation` (raw texts, extracted SQL, tokens,
seconds) whichever backend ran; `evaluate`, `sqlops eval`, the experiments and `make bench` all
call it. `evaluate.backend` picks:

- `vllm`: `.venv-vllm/bin/python pipelines/model/vllm_offline.py` in a subprocess (vLLM's pins
  conflict with this venv's), greedy, bf16, on the adapter merged into the base weights
  (`pipelines.model.merge`; on CPU vLLM runs plain weights ~3.4x faster than base + LoRA);
- `transformers`: `pipelines.model.generate.generate_sql` in this process (batched, left
  padding, shared-prefix KV cache);
- `auto`: vLLM when `make serve-setup` installed it and there are at least
  `evaluate.vllm_min_prompts` prompts (its engine start-up, ~30 s on 2 cores, would cost more
  than it saves on fewer); if the vLLM run fails, a warning and transformers instead.

Both backends get the same token ids and stop after the first `;` or at end of turn, and their
output goes through the same `extract_sql`.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

from pipelines.config import ROOT, EvaluateConfig
from pipelines.model.generate import Generation, generate_sql
from pipelines.model.merge import merged_model_dir
from pipelines.model.prompt import STOP
from pipelines.vllm_runtime import VLLMRuntime

log = logging.getLogger(__name__)
VLLM_SCRIPT = Path(__file__).with_name("vllm_offline.py")
_vllm_failed: list[str] = []  # a failure in this process: `auto` does not try vLLM again


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


def pick_backend(cfg: EvaluateConfig, n_prompts: int, problem: str | None) -> tuple[str, str]:
    """(backend, the reason, for the log); `problem` is what `vllm_problem()` says."""
    if cfg.backend == "transformers":
        return "transformers", "evaluate.backend is transformers"
    if cfg.backend == "vllm":
        if problem:
            raise RuntimeError(f"evaluate.backend is vllm, but {problem}")
        return "vllm", "evaluate.backend is vllm"
    if problem:
        return "transformers", problem
    if n_prompts < cfg.vllm_min_prompts:
        return "transformers", (
            f"{n_prompts} prompts < evaluate.vllm_min_prompts ({cfg.vllm_min_prompts}): "
            "vLLM's engine start-up would cost more than it saves"
        )
    return "vllm", "vLLM is installed: offline vLLM on merged weights is the fastest here"


def generate_vllm(
    model_dir: Path, token_ids: list[list[int]], cfg: EvaluateConfig, vllm: VLLMRuntime
) -> dict:
    """Run vllm_offline.py on the prompts' token ids; its result dict (raises when it fails)."""
    request = {
        "model": str(model_dir),
        "dtype": "bfloat16",
        "max_model_len": vllm.max_model_len,
        "max_num_seqs": cfg.vllm_max_num_seqs,
        "max_new_tokens": cfg.max_new_tokens,
        "stop": STOP,
        "prompt_token_ids": token_ids,
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
    spec: ModelSpec, tok, prompts: list[str], cfg: EvaluateConfig, vllm: VLLMRuntime
) -> Generation:
    """Greedy SQL for every prompt, from the backend `evaluate.backend` picks."""
    backend, why = pick_backend(cfg, len(prompts), vllm_problem(vllm))
    log.info("generation backend: %s (%s)", backend, why)
    if backend == "vllm":
        token_ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
        try:
            out = generate_vllm(spec.vllm_model_dir(vllm.merged_root), token_ids, cfg, vllm)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            if cfg.backend == "vllm":
                raise
            _vllm_failed.append(str(e).splitlines()[0])
            log.warning("vLLM generation failed, falling back to transformers: %s", e)
        else:
            result = Generation.of(out["texts"], sum(out["new_tokens"]), out["seconds"], "vllm")
            log.info(
                "generated %d prompts, %d tokens in %.1f s (%.0f tok/s; vLLM %s bf16, engine "
                "start-up %.1f s)", len(prompts), result.new_tokens, result.seconds,
                result.tokens_per_s, out["vllm_version"], out["load_seconds"],
            )  # fmt: skip
            result.load_seconds = out["load_seconds"]
            return result
    from pipelines.model.base import load_base

    model, _ = load_base(spec.base_dir, spec.adapter_dir)
    return generate_sql(model, tok, prompts, cfg.batch_size, cfg.max_new_tokens)
