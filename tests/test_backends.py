"""Generation backends: the merged model is the peft model, the backend choice and its fallback,
and (with `make serve-setup`) a real offline vLLM run on a tiny model."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

import pytest
import torch

from pipelines.config import load_params
from pipelines.data.records import read_jsonl
from pipelines.model import backends, devices
from pipelines.model.backends import ModelSpec, generate, load_tokenizer, pick_backend
from pipelines.model.base import load_base
from pipelines.model.decoding import GREEDY
from pipelines.model.generate import Generation, generate_sql
from pipelines.model.merge import INFO_FILE, merged_model_dir
from pipelines.model.prompt import build_prompt
from pipelines.sql import extract_sql
from pipelines.vllm_runtime import VLLMRuntime
from tests.real_vllm import needs_vllm_and_base_tokenizer

P = load_params()
CFG = P.evaluate.model_copy(update={"max_new_tokens": 8, "batch_size": 4})


def runtime(tmp_path, **fields) -> VLLMRuntime:
    """params.yaml's vLLM runtime with its merges and logs under `tmp_path`."""
    merged = {"merged_root": tmp_path / "merged", "run_dir": tmp_path / "run"}
    return dataclasses.replace(VLLMRuntime.of(P), **merged | fields)


def tiny_llama(tok, out):
    """A 2-layer Llama with head size 64 (vLLM's CPU attention supports it) and `tok`, saved."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_adapter(base_dir, out, seed: int):
    """A LoRA adapter laid out as training lays it out (params.yaml's layers and modules, rank
    4), with random (non-zero) B matrices, so merging changes the weights."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = load_params().train.model_copy(update={"lora_r": 4, "lora_alpha": 8})
    lora = devices.lora_config(cfg, base)
    lora.init_lora_weights = False
    get_peft_model(base, lora).save_pretrained(out)
    return out


def test_merged_model_gives_the_peft_models_logits_and_is_cached(tiny_base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(tiny_base_dir, tmp_path / "adapter", seed=1)
    merged = merged_model_dir(tiny_base_dir, adapter, tmp_path / "merged")
    assert (merged / INFO_FILE).is_file() and (merged / "tokenizer.json").is_file()
    assert load_tokenizer(merged).chat_template  # the prompt keeps its chat format

    ids = torch.tensor([[1, 5, 42, 300, 7, 99]])
    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    plain = base(ids).logits
    peft = PeftModel.from_pretrained(base, adapter).eval()
    standalone = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        expected, got = peft(ids).logits, standalone(ids).logits
    assert not torch.allclose(expected, plain, atol=1e-4)  # the adapter does something
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    stamp = (merged / INFO_FILE).stat().st_mtime_ns
    assert merged_model_dir(tiny_base_dir, adapter, tmp_path / "merged") == merged
    assert (merged / INFO_FILE).stat().st_mtime_ns == stamp  # merged once per adapter
    other = make_adapter(tiny_base_dir, tmp_path / "adapter2", seed=2)
    assert merged_model_dir(tiny_base_dir, other, tmp_path / "merged") != merged


def test_backend_choice_by_expected_time():
    """auto: vLLM once its start-up is paid back by its speed, at the dtype it runs in here."""
    speed = P.evaluate.speed.model_copy(
        update={
            "vllm_start_s": 60,
            "vllm_tok_s": 300,
            "vllm_fp32_tok_s": 50,
            "transformers_tok_s": 60,
        }  # fmt: skip
    )
    auto = CFG.model_copy(update={"backend": "auto", "speed": speed})
    # 60 + t/300 < t/60 from t = 4500 tokens on.
    assert pick_backend(auto, 6000, None, "bfloat16")[0] == "vllm"
    backend, why = pick_backend(auto, 3000, None, "bfloat16")
    assert backend == "transformers" and "evaluate.speed" in why
    # fp32 vLLM (no native bf16) is slower than transformers here: never worth its start-up.
    assert pick_backend(auto, 10**6, None, "float32")[0] == "transformers"
    assert pick_backend(auto, 64, "vLLM is not installed") == (
        "transformers",
        "vLLM is not installed",
    )
    # Figures measured on this machine win over evaluate.speed's: a slow engine start-up here.
    slow_start = {"vllm": {"start_s": 250, "tok_s": 300}}
    backend, why = pick_backend(auto, 6000, None, "bfloat16", slow_start)
    assert backend == "transformers" and "vllm: measured here" in why
    fast_fp32 = {"vllm": {"start_s": 40, "tok_s": 100}}
    assert pick_backend(auto, 12000, None, "float32", fast_fp32)[0] == "vllm"  # 160 vs 200 s
    forced = CFG.model_copy(update={"backend": "transformers"})
    assert pick_backend(forced, 1000, None)[0] == "transformers"
    wanted = CFG.model_copy(update={"backend": "vllm"})
    assert pick_backend(wanted, 1, None)[0] == "vllm"
    with pytest.raises(RuntimeError, match="not installed"):
        pick_backend(wanted, 64, "vLLM is not installed")


def test_measured_speeds_are_kept_per_backend_and_path(tmp_path):
    """What a generation measured is what `auto` reads next time; small runs are not kept."""
    assert backends.measured_speeds(tmp_path) == {}
    keys = backends.speed_keys(tmp_path / "base", "float32", batched=False)
    model = (tmp_path / "base").resolve()
    assert keys == {
        "vllm": f"{model} vllm-float32",
        "transformers": f"{model} transformers-per-prompt",
    }
    big = Generation([], [], 6000, 60.0, "vllm", load_seconds=41.3)
    backends.record_speed(tmp_path, keys["vllm"], big)
    backends.record_speed(tmp_path, keys["transformers"], Generation([], [], 50, 1.0))
    assert backends.measured_speeds(tmp_path) == {
        keys["vllm"]: {"tok_s": 100.0, "start_s": 41.3, "tokens": 6000}
    }
    (tmp_path / backends.SPEED_FILE).write_text("{not json")
    assert backends.measured_speeds(tmp_path) == {}


def _prompts(tok, prepared_dir):
    records = read_jsonl(prepared_dir / "eval.jsonl")
    return [build_prompt(r["ddl"], r["question"], tok) for r in records]


def test_a_failing_vllm_falls_back_to_transformers(
    tiny_base_dir, prepared_dir, tmp_path, monkeypatch, caplog
):
    """A .venv-vllm whose python has no vLLM (a broken install): auto warns and generates with
    transformers, then stops trying vLLM; an explicit `vllm` choice fails loudly."""
    broken = tmp_path / "venv-vllm"
    (broken / "bin").mkdir(parents=True)
    (broken / "bin" / "python").symlink_to(os.path.realpath(sys.executable))
    (broken / ".sqlops-installed").touch()
    vllm = runtime(tmp_path, venv=broken)
    monkeypatch.setattr(backends, "_vllm_failed", [])
    adapter = make_adapter(tiny_base_dir, tmp_path / "adapter", seed=3)
    spec = ModelSpec(tiny_base_dir, adapter)
    tok = load_tokenizer(tiny_base_dir)
    prompts = _prompts(tok, prepared_dir)
    fast = P.evaluate.speed.model_copy(update={"vllm_start_s": 0, "vllm_fp32_tok_s": 10**6})
    cfg = CFG.model_copy(update={"backend": "auto", "speed": fast})

    with caplog.at_level(logging.WARNING, logger="pipelines.model.backends"):
        gen = generate(spec, tok, prompts, cfg, vllm, P.decoding)
    assert "falling back to transformers" in caplog.text and "vllm" in caplog.text.lower()
    model, _ = load_base(tiny_base_dir, adapter)
    assert gen.backend == "transformers"
    assert gen.sql == generate_sql(model, tok, prompts, 4, 8).sql
    assert pick_backend(cfg, 64, backends.vllm_problem(vllm))[1].startswith("vLLM failed earlier")
    monkeypatch.setattr(backends, "_vllm_failed", [])
    with pytest.raises(RuntimeError, match="vLLM exited"):
        generate(spec, tok, prompts, cfg.model_copy(update={"backend": "vllm"}), vllm, P.decoding)


@pytest.mark.slow
@needs_vllm_and_base_tokenizer
def test_real_vllm_generates_from_a_merged_tiny_model(tmp_path, prepared_dir):
    """vllm_offline.py in .venv-vllm on a tiny Llama with a merged adapter (head size 64, which
    vLLM's CPU attention supports)."""
    tok = load_tokenizer(load_params().path("base_model"))
    base_dir = tiny_llama(tok, tmp_path / "base")
    adapter = make_adapter(base_dir, tmp_path / "adapter", seed=4)
    spec = ModelSpec(base_dir, adapter)
    prompts = _prompts(tok, prepared_dir)
    cfg = CFG.model_copy(update={"backend": "vllm"})

    rt = runtime(tmp_path, max_model_len=1024, enforce_eager=True)
    gen = generate(spec, tok, prompts, cfg, rt, GREEDY)
    assert gen.backend == "vllm" and len(gen.texts) == len(gen.sql) == len(prompts)
    assert "enforce_eager=True" in (rt.run_dir / "vllm-offline.log").read_text()
    assert 0 < gen.new_tokens <= len(prompts) * cfg.max_new_tokens and gen.tokens_per_s > 0
    assert gen.load_seconds > 0
    assert gen.sql == [extract_sql(t) for t in gen.texts]  # the same extraction as transformers
    # Generation stops at the end of the first statement: nothing follows a `;`.
    assert all(t.endswith(";") for t in gen.texts if ";" in t)
