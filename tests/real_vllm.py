"""The real vLLM server (from .venv-vllm) for the slow tests: started on the params' port in its
own process group, awaited until healthy, stopped by PID; and the skip rule for machines
without `make serve-setup` or the real model files."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.config import ROOT, Params, load_params
from pipelines.serving.vllm_server import VLLMAdmin, vllm_command, vllm_env
from pipelines.vllm_runtime import VLLMRuntime

_P = load_params()
needs_real_vllm = pytest.mark.skipif(
    VLLMRuntime.of(_P).problem() is not None
    or not (_P.path("base_model") / "config.json").is_file()
    or not (_P.path("prepared") / "eval.jsonl").is_file(),
    reason="needs make serve-setup, models/base and data/prepared",
)
# Tests that run vLLM on a tiny model built with the base model's tokenizer.
needs_vllm_and_base_tokenizer = pytest.mark.skipif(
    VLLMRuntime.of(_P).problem() is not None
    or not (_P.path("base_model") / "tokenizer.json").is_file(),
    reason="needs make serve-setup and models/base (its tokenizer)",
)


@contextlib.contextmanager
def running_vllm(p: Params, log_dir: Path, timeout_s: float | None = None) -> Iterator[VLLMAdmin]:
    """vLLM as `p` configures it (port, LoRA, dtype), its output in `log_dir`/vllm.log: the
    base model with runtime LoRA, so `p` must say `serving.merged: false`."""
    assert p.serving.merged is False, "running_vllm serves runtime LoRA: set serving.merged false"
    log_path = log_dir / "vllm.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            vllm_command(p), cwd=ROOT, env=vllm_env(p), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    admin = VLLMAdmin(f"http://127.0.0.1:{p.serving.vllm_port}/v1")
    deadline = time.monotonic() + (timeout_s or p.serving.vllm_startup_timeout_s)
    try:
        while not admin.healthy():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "vLLM did not become healthy"
            time.sleep(2)
        yield admin
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
