"""Every registered version keeps its own base model: base weights stored once per content hash.

    store_base(p)        at registration: `paths.base_model` hard-linked (or copied) into
                         `paths.base_models/<sha256[:16]>/`, and logged to MLflow once per hash (a
                         run of the `base-models` experiment tagged with the hash, artifacts
                         `base/`), so a version registered elsewhere can be fetched here
    base_dir_for(ref, …) the folder holding a version's base: the store folder; else
                         `paths.base_model` when its hash matches (stored first); else the MLflow
                         copy downloaded into the store (hash verified); else `BaseUnavailable`,
                         one line saying what is missing
    version_base_dir(…)  the same for a registered version, from its tags (None: a version that
                         names no base, served on the configured one as before)

Serving starts vLLM on the store folder, so the path vLLM reports names the weights it holds
even after `paths.base_model` is rebuilt on another base model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.config import MlflowConfig, Params
from pipelines.tracking import artifact_location, tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)
INFO = "base_info.json"  # written by the base_model stage beside the weights
EXPERIMENT = "base-models"  # the MLflow experiment whose runs hold one base model each
ARTIFACT = "base"  # the artifact folder of such a run


class BaseUnavailable(RuntimeError):
    """A version's base model is nowhere this machine can read it (one line: what is missing)."""


@dataclass(frozen=True)
class BaseRef:
    """What a version records of its base model: id, weights hash, and its MLflow copy."""

    id: str
    hash: str  # weights_sha256 of base_info.json
    uri: str | None = None  # runs:/<run id>/base (None: registered before bases were logged)
    licence: str | None = None  # the terms of the weights (base_info.json; MODEL_CARD.md beside)

    def tags(self) -> dict[str, str]:
        """The version's lineage tags (DESIGN.md: `base_model`, `base_model_hash`), where its
        base's copy is and which licence applies (the MLflow UI shows them per version)."""
        tags = {"base_model": self.id, "base_model_hash": self.hash}
        tags |= {"base_model_uri": self.uri} if self.uri else {}
        return tags | ({"base_model_licence": self.licence} if self.licence else {})

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> BaseRef | None:
        if not tags.get("base_model_hash"):
            return None
        return cls(
            tags.get("base_model", "unknown"),
            tags["base_model_hash"],
            tags.get("base_model_uri"),
            tags.get("base_model_licence"),
        )

    def short(self) -> str:
        return f"{self.id} (weights {self.hash[:12]})"


def read_info(base_dir: Path) -> dict | None:
    try:
        return json.loads((Path(base_dir) / INFO).read_text())
    except (OSError, ValueError):
        return None


def weights_sha256(base_dir: Path) -> str:
    """sha256 over the names and bytes of the safetensors files: for one file (every catalogue
    model) the `weights_sha256` the base_model stage records."""
    h = hashlib.sha256()
    for f in sorted(Path(base_dir).glob("*.safetensors")):
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def store_folder(store: Path, weights_hash: str) -> Path:
    return Path(store) / weights_hash[:16]


def _stored(folder: Path, weights_hash: str) -> bool:
    return (read_info(folder) or {}).get("weights_sha256") == weights_hash


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # no second copy of the weights on the same file system
    except OSError:
        shutil.copy2(src, dst)


def _install(files: Path, folder: Path) -> Path:
    """`files` copied into `folder` through a temporary sibling renamed at the end: a store
    folder that exists is complete."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-") as tmp:
        work = Path(tmp) / "base"
        shutil.copytree(files, work, copy_function=_link_or_copy)
        if not folder.exists():
            work.rename(folder)
    return folder


def store_local(base_dir: Path, store: Path) -> Path:
    """The store folder of the base model in `base_dir` (made on first use)."""
    info = read_info(base_dir)
    if info is None:
        raise BaseUnavailable(
            f"{base_dir} holds no base model ({INFO} missing): run `dvc repro base_model`"
        )
    folder = store_folder(store, info["weights_sha256"])
    return folder if _stored(folder, info["weights_sha256"]) else _install(base_dir, folder)


def _experiment_id(client: MlflowClient, cfg: MlflowConfig) -> str:
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    location = artifact_location(cfg, tracking_uri(cfg))
    if location is None:  # a tracking server: its own artifact root
        return client.create_experiment(EXPERIMENT)
    location.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(EXPERIMENT, artifact_location=location.as_uri())


def log_base(client: MlflowClient, cfg: MlflowConfig, folder: Path) -> str:
    """The MLflow copy of the base model in `folder`: a run logged once per weights hash."""
    info = read_info(folder) or {}
    weights_hash = info["weights_sha256"]
    exp_id = _experiment_id(client, cfg)
    found = client.search_runs(
        [exp_id], f"tags.base_model_hash = '{weights_hash}' and attributes.status = 'FINISHED'"
    )
    if found:
        return f"runs:/{found[0].info.run_id}/{ARTIFACT}"
    tags = {"base_model": info.get("id", "unknown"), "base_model_hash": weights_hash}
    if info.get("licence"):
        tags["licence"] = str(info["licence"])
    run = client.create_run(exp_id, tags=tags, run_name=f"base-{weights_hash[:12]}")
    client.log_artifacts(run.info.run_id, str(folder), ARTIFACT)
    client.set_terminated(run.info.run_id)
    log.info("logged base model %s to MLflow run %s", tags["base_model"], run.info.run_id)
    return f"runs:/{run.info.run_id}/{ARTIFACT}"


def store_base(p: Params, client: MlflowClient) -> BaseRef:
    """`paths.base_model` in the store and in MLflow (each once per hash); what a version
    registered on it records."""
    folder = store_local(p.path("base_model"), p.path("base_models"))
    info = read_info(folder) or {}
    return BaseRef(
        info.get("id", "unknown"),
        info["weights_sha256"],
        log_base(client, p.mlflow, folder),
        info.get("licence"),
    )


def fetch(ref: BaseRef, store: Path) -> Path:
    """The MLflow copy of `ref` downloaded into the store, its weights hash checked."""
    import mlflow

    folder = store_folder(store, ref.hash)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".fetch-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.uri, dst_path=tmp))
        got = weights_sha256(local)
        if got != ref.hash:
            raise BaseUnavailable(f"{ref.uri} holds weights {got[:12]}, not {ref.short()}")
        _install(local, folder)
    log.info("fetched base model %s from %s into %s", ref.short(), ref.uri, folder)
    return folder


def base_dir_for(ref: BaseRef, local: Path, store: Path) -> Path:
    """The folder with `ref`'s weights: the store, `local` (paths.base_model), or MLflow."""
    folder = store_folder(store, ref.hash)
    if _stored(folder, ref.hash):
        return folder
    here = read_info(local)
    if here is not None and here.get("weights_sha256") == ref.hash:
        return store_local(local, store)
    if ref.uri is None:
        has = f"weights {here['weights_sha256'][:12]}" if here else "no base model"
        raise BaseUnavailable(
            f"base model {ref.short()} is not in {folder} and {local} has {has}; no MLflow copy "
            "is recorded (rebuild it there with `dvc repro base_model` on that source)"
        )
    try:
        return fetch(ref, store)
    except BaseUnavailable:
        raise
    except Exception as e:  # MLflow unreachable, run deleted, disk full: one line, not a trace
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BaseUnavailable(
            f"base model {ref.short()} is not in {folder} nor {local}, and {ref.uri} could not "
            f"be fetched: {reason}"
        ) from e


def version_base_dir(p: Params, client: MlflowClient, name: str, version: int) -> Path | None:
    """The base-model folder of registered `name` version `version` (None: it names none)."""
    ref = BaseRef.from_tags(client.get_model_version(name, str(version)).tags)
    if ref is None:
        return None
    try:
        return base_dir_for(ref, p.path("base_model"), p.path("base_models"))
    except BaseUnavailable as e:
        raise BaseUnavailable(f"{name} v{version}: {e}") from None
