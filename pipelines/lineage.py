"""Lineage facts every MLflow run and model version carries: git commit, data hash, base model.

The data hash is DVC's own hash of the prepared-data directory (read from dvc.lock) so the MLflow
UI and `dvc` name the same data version; outside a DVC run it falls back to a content hash.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import yaml

from pipelines.config import ROOT


def git_commit(root: Path = ROOT) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=root,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def content_hash(path: Path) -> str:
    """sha256 over the relative names and bytes of every file under `path` (or of one file)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def dvc_hash(path: Path, root: Path = ROOT) -> str:
    """DVC's md5 of an output as recorded in dvc.lock, else `sha256:<content hash>`."""
    lock = root / "dvc.lock"
    try:
        rel = str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        rel = None
    if rel and lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for stage in stages.values():
            for out in stage.get("outs", []):
                if out.get("path") == rel and out.get("md5"):
                    return out["md5"]
    return "sha256:" + content_hash(path)


def base_model_info(base_dir: Path) -> dict:
    """The id and weights hash that the `base_model` stage wrote next to the weights."""
    return json.loads((Path(base_dir) / "base_info.json").read_text())
