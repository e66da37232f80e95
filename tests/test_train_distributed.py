"""Training through `accelerate launch` (several processes), on CUDA, and QLoRA's preconditions.

The multi-process test runs the real entry point (`python -m pipelines.model.train`) with two
gloo processes on the CPU. `gpu` tests (skipped by default) train on CUDA:
`python -m pytest -m gpu tests/test_train_distributed.py -q`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import warnings

import pytest
import torch
import yaml

import mlflow
from pipelines.config import PARAMS_FILE, ROOT, TrainConfig
from pipelines.model import devices, train
from tests.test_train import CFG, _run

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _params_file(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg, **train_overrides):
    """A copy of params.yaml pointing at the tiny model, the fixture data and tmp outputs."""
    p = yaml.safe_load(PARAMS_FILE.read_text())
    p["paths"].update(
        base_model=str(tiny_base_dir),
        prepared=str(prepared_dir),
        adapter=str(tmp_path / "adapter"),
        checkpoints=str(tmp_path / "ckpt"),
        train_metrics=str(tmp_path / "metrics" / "train.json"),
    )
    p["train"] = {**CFG, **train_overrides}
    p["seed"] = 0  # as `_run` trains
    p["mlflow"] = mlflow_cfg.model_dump(mode="json")
    out = tmp_path / "params.yaml"
    out.write_text(yaml.safe_dump(p))
    return out


def _train_stage(params_file, timeout: float = 150, tries: int = 2) -> None:
    """The train stage as DVC runs it. The launcher, its ranks and their children form one
    process group, killed whole on a timeout. A hang was seen once in ~10 runs of the 2-process
    CPU launch (rank 1 gone, rank 0 idle; cause not found yet): one retry, with a warning."""
    env = {k: v for k, v in os.environ.items() if k not in (devices.LAUNCHED_ENV, "LOCAL_RANK")}
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "pipelines.model.train", "--params", str(params_file)]
    for attempt in range(1, tries + 1):
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            warnings.warn(f"train stage hung (attempt {attempt} of {tries})", stacklevel=2)
            continue
        assert proc.returncode == 0, stderr[-4000:]
        return
    pytest.fail(f"train stage hung {tries} times ({timeout:.0f} s each)")


def _one_run(mlflow_cfg) -> mlflow.entities.Run:
    mlflow.set_tracking_uri(mlflow_cfg.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[mlflow_cfg.experiment], output_format="list")
    assert len(runs) == 1  # rank 0 alone tracks
    return runs[0]


def test_launch_only_from_the_first_process(monkeypatch):
    monkeypatch.delenv(devices.LAUNCHED_ENV, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    one, two = TrainConfig(**CFG), TrainConfig(**{**CFG, "num_processes": 2})
    assert not devices.should_launch(one) and devices.should_launch(two)
    monkeypatch.setenv(devices.LAUNCHED_ENV, "1")  # a launched process trains, never recurses
    assert not devices.should_launch(two)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="has deepspeed")
def test_deepspeed_without_deepspeed_stops_before_training(
    tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg
):
    config = "infra/accelerate/deepspeed_zero2.yaml"
    params = _params_file(
        tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg, num_processes=2, accelerate_config=config
    )
    with pytest.raises(RuntimeError, match="DeepSpeed, which is not installed"):
        train.main(["--params", str(params)])
    assert not (tmp_path / "adapter").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available(),
    reason="QLoRA can run here",
)
def test_qlora_without_bitsandbytes_or_gpu_stops_before_training(
    tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg
):
    with pytest.raises(RuntimeError, match="bitsandbytes|CUDA GPU"):
        _run(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg, quantization="4bit")
    assert not (tmp_path / "adapter").exists()
    assert not (tmp_path / "mlflow.db").exists()  # stopped before tracking anything


@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg):
    """Two gloo processes through `accelerate launch`: each takes half of every batch, the
    gradients are all-reduced, rank 0 alone writes and tracks. The losses match one process
    training the same batches (the world-size loss weighting is exact)."""
    single = _run(tmp_path / "single", tiny_base_dir, prepared_dir, mlflow_cfg)
    mlflow.delete_run(single["run_id"])  # leave only the launched run in the experiment

    params = _params_file(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg, num_processes=2)
    _train_stage(params)
    info = json.loads((tmp_path / "adapter" / "train_info.json").read_text())
    assert info["processes"] == 2 and info["steps"] == CFG["max_steps"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "ckpt").exists()
    assert json.loads((tmp_path / "metrics" / "train.json").read_text())["steps"] == 4
    assert info["final_loss"] == pytest.approx(single["final_loss"], rel=1e-3)
    assert info["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-3)
    run = _one_run(mlflow_cfg)
    assert run.info.run_id == info["run_id"] and run.data.params["processes"] == "2"
    history = mlflow.tracking.MlflowClient().get_metric_history(info["run_id"], "train_loss")
    assert [m.step for m in history] == [1, 2, 3, 4]


# --- on a CUDA GPU: `python -m pytest -m gpu tests/test_train_distributed.py -q` ---

GPU_CFG = dict(precision="auto", learning_rate=5e-3, max_steps=12, eval_every=6, log_every=4)


@pytest.mark.gpu
@needs_cuda
def test_cuda_trains_in_bf16_with_a_fused_optimizer(
    tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg
):
    info = _run(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg, **GPU_CFG)
    assert info["device"] == "cuda" and info["precision"] == "torch.bfloat16"
    assert info["optimizer"] == "adamw_fused"
    assert torch.backends.cuda.matmul.allow_tf32
    assert info["loss_last_10"] < info["loss_first_10"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("config", ["infra/accelerate/ddp.yaml", "infra/accelerate/fsdp.yaml"])
def test_accelerate_launch_on_one_gpu(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg, config):
    params = _params_file(
        tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg, accelerate_config=config, **GPU_CFG
    )
    _train_stage(params)
    info = json.loads((tmp_path / "adapter" / "train_info.json").read_text())
    assert info["processes"] == 1 and info["device"] == "cuda"
    assert info["steps"] == GPU_CFG["max_steps"] and info["loss_last_10"] < info["loss_first_10"]
    assert _one_run(mlflow_cfg).info.run_id == info["run_id"]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more GPUs")
def test_accelerate_launch_on_every_gpu(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg):
    n = torch.cuda.device_count()
    params = _params_file(
        tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg, num_processes=n, **GPU_CFG
    )
    _train_stage(params)
    info = json.loads((tmp_path / "adapter" / "train_info.json").read_text())
    assert info["processes"] == n and info["steps"] == GPU_CFG["max_steps"]
    assert _one_run(mlflow_cfg).info.run_id == info["run_id"]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="no bitsandbytes")
def test_qlora_4bit_trains(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg):
    info = _run(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg, quantization="4bit", **GPU_CFG)
    assert info["quantization"] == "4bit" and info["loss_last_10"] < info["loss_first_10"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
