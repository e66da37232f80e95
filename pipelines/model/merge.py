"""A LoRA adapter folded into its base weights, saved once as a standalone HF model directory.

vLLM on CPU generates ~3.4x faster from plain weights than from base + an unmerged adapter, and
a merged directory is what vLLM (offline or served) loads like any other model. The directory
is keyed by the content of the base weights and of the adapter, so each adapter is merged once
and a retrained adapter never reuses a stale merge:

    <cache_root>/<sha256(base weights, adapter)[:16]>/   config, safetensors, tokenizer,
                                                         chat template, merge_info.json
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from pipelines.lineage import content_hash

log = logging.getLogger(__name__)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
INFO_FILE = "merge_info.json"


def merge_key(base_dir: Path, adapter_dir: Path) -> str:
    """Hash of the base weights + config and the adapter's weights + config."""
    h = hashlib.sha256()
    for f in [*sorted(Path(base_dir).glob("*.safetensors")), Path(base_dir) / "config.json"]:
        h.update(content_hash(f).encode())
    for name in ADAPTER_FILES:
        h.update(content_hash(Path(adapter_dir) / name).encode())
    return h.hexdigest()[:16]


def merged_model_dir(base_dir: Path, adapter_dir: Path, cache_root: Path) -> Path:
    """The merged model for (base, adapter): built on first use, reused afterwards."""
    from pipelines.model.base import load_base

    key = merge_key(base_dir, adapter_dir)
    target = Path(cache_root) / key
    if (target / INFO_FILE).is_file():
        return target
    start = time.monotonic()
    model, tok = load_base(base_dir, adapter_dir, merge=True)  # peft merge_and_unload
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed: a merge cut short never looks finished.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{key}-") as tmp:
        work = Path(tmp) / "model"
        model.save_pretrained(work, safe_serialization=True)  # the base's dtype (fp32)
        tok.save_pretrained(work)  # tokenizer + chat template
        info = {"base_model": str(base_dir), "adapter": str(adapter_dir), "key": key}
        (work / INFO_FILE).write_text(json.dumps(info, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        work.rename(target)
    log.info("merged %s into %s -> %s in %.1f s", adapter_dir, base_dir, target,
             time.monotonic() - start)  # fmt: skip
    return target
