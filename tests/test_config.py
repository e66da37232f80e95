"""params.yaml loads into the typed config, and settings that cannot work together are refused."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from pipelines.config import PARAMS_FILE, Params, load_params


def raw_params() -> dict:
    raw = yaml.safe_load(PARAMS_FILE.read_text())
    raw["validate_"] = raw.pop("validate")
    return raw


def test_params_yaml_loads():
    p = load_params()
    assert p.serving.max_lora_rank >= p.train.lora_r


def test_lora_rank_above_what_vllm_accepts_is_refused():
    raw = raw_params()
    raw["serving"]["max_lora_rank"] = raw["train"]["lora_r"] // 2
    with pytest.raises(ValidationError, match="max_lora_rank"):
        Params.model_validate(raw)


def test_unknown_knob_is_refused():
    raw = raw_params()
    raw["train"]["lora_rank"] = 8  # a typo of lora_r must not be silently ignored
    with pytest.raises(ValidationError, match="lora_rank"):
        Params.model_validate(raw)
