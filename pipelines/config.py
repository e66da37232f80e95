"""Typed view of params.yaml: one pydantic model per block, each field commented.

Every stage's `main()` calls `load_params()` and hands its block to `run()`. Nothing else
reads params.yaml, and no function repeats a default held here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict

ROOT = Path(__file__).resolve().parent.parent
PARAMS_FILE = ROOT / "params.yaml"


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class Paths(_Block):
    base_model: Path  # safetensors + tokenizer of the base model
    synthetic: Path  # synth output: examples.jsonl + databases/
    prepared: Path  # train.jsonl, eval.jsonl, databases/, stats.json
    validation: Path  # Great Expectations summary + Data Docs
    adapter: Path  # final LoRA adapter + train_info.json
    checkpoints: Path  # resumable training state
    eval_metrics: Path  # metrics/eval.json (output contract)
    predictions: Path  # one JSON line per evaluated example and model
    train_metrics: Path  # final training figures (DVC metrics)
    judge_cache: Path  # SQLite cache of judge verdicts (kept across runs, not a DVC output)


class BaseModelConfig(_Block):
    source: str  # "smollm2-gguf" (offline wheel), an HF model id, or a local directory
    id: str  # model id recorded as lineage when the source is the wheel


class SynthConfig(_Block):
    domains: list[str]  # synthetic databases to build, one per domain
    examples_per_domain: int  # question/SQL pairs generated per domain
    langs: list[str]  # question languages


class SourceConfig(_Block):
    model_config = ConfigDict(extra="allow", frozen=True)
    type: Literal["synthetic", "jsonl", "spider", "feedback"]  # importer to use
    path: Path | None = None  # where the source lives (synthetic: paths.synthetic)


class DataConfig(_Block):
    sources: list[SourceConfig]  # importers run by `prepare`
    split: Literal["held_out_domain", "random"]  # how eval examples are chosen
    eval_domains: list[str]  # held-out domains (split: held_out_domain)
    eval_fraction: float  # share of examples for eval (split: random)


class ValidateConfig(_Block):
    min_question_chars: int  # shorter questions are rejected
    max_question_chars: int  # longer questions are rejected
    langs: list[str]  # allowed values of `lang`
    sql_timeout_s: float  # gold SQL must execute within this time


class TrainConfig(_Block):
    lora_r: int  # LoRA rank
    lora_alpha: int  # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float  # dropout on the LoRA branch
    target_modules: str | list[str]  # "all-linear" or module names
    learning_rate: float  # peak learning rate (AdamW)
    weight_decay: float  # AdamW weight decay
    warmup_ratio: float  # share of steps with linear warmup, then linear decay
    batch_size: int  # examples per micro-batch
    grad_accum: int  # micro-batches per optimizer step
    max_steps: int  # optimizer steps
    max_length: int  # examples longer than this (tokens) are truncated from the left of the DDL
    precision: Literal["auto", "fp32", "bf16"]  # auto: bf16 autocast where it helps
    log_every: int  # steps between metric logs
    checkpoint_every: int  # steps between resumable checkpoints


class JudgeConfig(_Block):
    model: str  # judge model name at the OpenAI-compatible endpoint
    max_concurrency: int  # parallel judge requests
    max_retries: int  # attempts per example before `judge_error`
    timeout_s: float  # per-request timeout
    rpm_limit: int | None  # requests per minute (None = no limit)
    tpm_limit: int | None  # tokens per minute (None = no limit)
    price_per_1k_in: float  # USD per 1k prompt tokens, for cost accounting
    price_per_1k_out: float  # USD per 1k completion tokens


class EvaluateConfig(_Block):
    max_examples: int  # deterministic sample of the eval split (0 = all)
    batch_size: int  # prompts per generation batch
    max_new_tokens: int  # generation budget per prompt
    sql_timeout_s: float  # per-query execution limit
    float_tolerance: float  # relative tolerance when comparing result values
    bootstrap_samples: int  # resamples for the 95% interval of execution accuracy
    judge: JudgeConfig


class RegistryConfig(_Block):
    model_name: str  # registered model in MLflow
    min_delta: float  # challenger must beat the champion by more than this


class ServingConfig(_Block):
    inference_log_url: str  # SQLAlchemy URL of the inference log (relative sqlite: repo root)


class MlflowConfig(_Block):
    tracking_uri: str  # relative sqlite paths are resolved against the repo root
    artifact_location: Path  # experiment artifact root
    experiment: str  # experiment name


class Params(_Block):
    paths: Paths
    seed: int  # one seed for synth, split, training and sampling
    base_model: BaseModelConfig
    synth: SynthConfig
    data: DataConfig
    validate_: ValidateConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    registry: RegistryConfig
    serving: ServingConfig
    mlflow: MlflowConfig

    def path(self, name: str) -> Path:
        """An artifact path from `paths:`, absolute against the repo root."""
        p = getattr(self.paths, name)
        return p if p.is_absolute() else ROOT / p


def load_params(path: Path = PARAMS_FILE) -> Params:
    raw = yaml.safe_load(Path(path).read_text())
    raw["validate_"] = raw.pop("validate")  # `validate` is a pydantic method name
    return Params.model_validate(raw)


def setup_entry_point() -> None:
    """Configure logging and the tools' environment once, at an entry point (stage `main()`,
    CLI). Keeps the libraries offline, quiet, and writing their state inside the repo."""
    logging.basicConfig(
        level=os.environ.get("SQLOPS_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for key, value in {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(ROOT / ".dvc" / "tmp" / "site-cache"),
        "PREFECT_HOME": str(ROOT / ".prefect"),
        "PREFECT_LOGGING_EXTRA_LOGGERS": "pipelines",
        # Ephemeral Prefect needs longer than its default 20 s to start on 2 cores.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    }.items():
        os.environ.setdefault(key, value)
