"""The MLflow model registry side of a release: register, gate, promote, roll back.

A model version is an `mlflow.pyfunc` model whose artifacts are the LoRA adapter; its config
and tags name its base model by id, weights hash and MLflow copy (pipelines/model/base_store.py
keeps each base once per hash), and its code is this package (so the version loads anywhere
through `mlflow.pyfunc.load_model("models:/text2sql@champion")`, on its own base model).
Aliases, not stages: `challenger` is the newest candidate, `champion` the one served. The
registered model's `champion_history` tag lists past champions so `rollback` can go back.

Called by `sqlops release|rollback` and by the Prefect release tasks; nothing here runs in DVC.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException

import mlflow
from mlflow import MlflowClient
from pipelines.config import Params, resolve, sqlite_url
from pipelines.data.records import read_jsonl
from pipelines.lineage import content_hash
from pipelines.model.base_store import BaseRef, base_dir_for, store_base, version_base_dir
from pipelines.release.gate import Decision, LiveErrors, live_errors, should_promote
from pipelines.tracking import configure_mlflow

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "champion_history"


class Text2SQLModel(mlflow.pyfunc.PythonModel):
    """predict(DataFrame[question, ddl]) -> list of SQL strings (transformers, in process).

    `base_dir` and `adapter_dir` name the checked base weights and the version's adapter, for
    callers that generate with another backend (`sqlops eval`); the weights load on first
    `predict`."""

    def load_context(self, context) -> None:
        cfg = context.model_config
        ref = BaseRef(cfg["base_model_id"], cfg["base_model_hash"], cfg.get("base_model_uri"))
        local = Path(cfg["base_model_path"])
        # Versions registered before the store named none: it sits beside paths.base_model.
        store = Path(cfg.get("base_store_path") or local.parent / "bases")
        self.base_dir = base_dir_for(ref, local, store)
        self.adapter_dir = Path(context.artifacts["adapter"])
        self.batch_size, self.max_new_tokens = cfg["generation_batch_size"], cfg["max_new_tokens"]
        self.model = self.tok = None

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        from pipelines.model.base import load_base
        from pipelines.model.generate import generate_sql
        from pipelines.model.prompt import build_prompt

        if self.model is None:
            self.model, self.tok = load_base(self.base_dir, self.adapter_dir)
        prompts = [
            build_prompt(ddl, q, self.tok)
            for q, ddl in zip(model_input["question"], model_input["ddl"], strict=True)
        ]
        return generate_sql(self.model, self.tok, prompts, self.batch_size, self.max_new_tokens).sql


@dataclass
class ReleaseResult:
    version: int
    run_id: str
    decision: Decision
    champion: int | None  # champion version after the release
    reused: bool  # the adapter was registered before; no new version was made


def _flat_metrics(metrics: dict) -> dict[str, str]:
    t = metrics["tuned"]
    keys = ("execution_accuracy", "exact_match", "valid_sql_rate", "judge_accuracy")
    return {f"eval_{k}": f"{t[k]:.4f}" for k in keys if t.get(k) is not None}


def register(p: Params, client: MlflowClient) -> tuple[int, bool]:
    """Register the current adapter as a new version (or find the version that holds it)."""
    adapter_dir = p.path("adapter")
    train_info = json.loads((adapter_dir / "train_info.json").read_text())
    metrics = json.loads(p.path("eval_metrics").read_text())
    adapter_hash = content_hash(adapter_dir / "adapter_model.safetensors")
    name = p.registry.model_name
    for mv in client.search_model_versions(f"name = '{name}'"):
        if mv.tags.get("adapter_hash") == adapter_hash:
            log.info("adapter already registered as %s version %s", name, mv.version)
            return int(mv.version), True

    base = store_base(p, client)  # the version's base, reachable wherever it is loaded
    config = {
        "base_model_path": str(p.path("base_model")),
        "base_store_path": str(p.path("base_models")),
        "base_model_id": base.id,
        "base_model_hash": base.hash,
        "base_model_uri": base.uri,
        "generation_batch_size": p.evaluate.batch_size,  # not `batch_size`: a training param
        "max_new_tokens": p.evaluate.max_new_tokens,
    }
    example = pd.DataFrame(
        {
            "question": ["How many players are there?"],
            "ddl": ["CREATE TABLE players (player_id INTEGER PRIMARY KEY);"],
        }
    )
    with mlflow.start_run(run_id=train_info["run_id"]):
        info = mlflow.pyfunc.log_model(
            name="text2sql",
            python_model=Text2SQLModel(),
            artifacts={"adapter": str(adapter_dir)},
            model_config=config,
            code_paths=[str(resolve("pipelines"))],
            signature=mlflow.models.infer_signature(example, ["SELECT COUNT(*) FROM players"]),
            pip_requirements=[f"-r {resolve('requirements.lock')}"],
            registered_model_name=name,
        )
        mlflow.log_dict(metrics, "eval/eval.json")
        mlflow.log_dict(outcomes(p.path("predictions")), "eval/outcomes.json")
    version = int(info.registered_model_version)
    tags = {
        "git_commit": mlflow.get_run(train_info["run_id"]).data.tags.get("git_commit", "unknown"),
        "data_hash": train_info["data_hash"],
        **base.tags(),
        "adapter_hash": adapter_hash,
        "run_id": train_info["run_id"],
        **_flat_metrics(metrics),
    }
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, v)
    log.info("registered %s version %d from run %s", name, version, train_info["run_id"])
    return version, False


def _version_json(client: MlflowClient, name: str, version: int, artifact: str) -> dict:
    """A JSON artifact of the run a version was registered from."""
    mv = client.get_model_version(name, str(version))
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=mv.run_id, artifact_path=artifact, dst_path=tmp
        )
        return json.loads(Path(path).read_text())


def version_metrics(client: MlflowClient, name: str, version: int) -> dict:
    """The eval.json a version was registered with (from its run's artifacts)."""
    return _version_json(client, name, version, "eval/eval.json")


def outcomes(predictions: Path) -> dict[str, dict[str, bool]]:
    """Per-example execution verdicts on the reported split by model ("base", "tuned") and
    example id: what the paired test of the gate compares (not the selection or real-schema
    rows the predictions also hold)."""
    out: dict[str, dict[str, bool]] = {}
    if not predictions.is_file():
        return out  # the gate then skips its paired test
    for row in read_jsonl(predictions):
        if row.get("dataset", "eval") == "eval":
            out.setdefault(row["model"], {})[row["id"]] = bool(row["execution_match"])
    return out


def version_outcomes(client: MlflowClient, name: str, version: int) -> dict | None:
    """The verdicts a version was registered with (None for versions registered without)."""
    try:
        return _version_json(client, name, version, "eval/outcomes.json")
    except (MlflowException, OSError):
        return None


def paired_verdicts(
    challenger: dict[str, bool], reference: dict[str, bool] | None
) -> tuple[list[bool], list[bool]] | None:
    """Aligned verdicts on the examples both were scored on (None when there are none)."""
    common = sorted(set(challenger) & set(reference or {}))
    if not common:
        return None
    return [challenger[i] for i in common], [reference[i] for i in common]


def current_version(client: MlflowClient, name: str, alias: str) -> int | None:
    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _history(client: MlflowClient, name: str) -> list[int]:
    return json.loads(client.get_registered_model(name).tags.get(HISTORY_TAG, "[]"))


def live_traffic(p: Params) -> dict[str, LiveErrors]:
    """Shadow answers in the inference log by served name (`text2sql-v<N>`): what the gate and
    `sqlops summary` read of live traffic. Empty when there is no log yet."""
    from sqlalchemy.engine import make_url

    from pipelines.serving.inference_log import InferenceLog

    url = p.serving.inference_log_url
    parsed = make_url(sqlite_url(url))
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
        return {}  # not created here: a release must not make an empty log
    rows = InferenceLog(url).window(shadow=True)
    return {
        str(name): live_errors(group["status"].tolist())
        for name, group in rows.groupby("model_version")
    }


def set_champion(client: MlflowClient, name: str, version: int) -> None:
    """Move the champion alias and record the move in the model's history tag."""
    client.set_registered_model_alias(name, CHAMPION, str(version))
    history = [v for v in _history(client, name) if v != version] + [version]
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))


def release(p: Params) -> ReleaseResult:
    """register → alias challenger → gate → alias champion (when the gate says so)."""
    configure_mlflow(p.mlflow)
    client = MlflowClient()
    name = p.registry.model_name
    version, reused = register(p, client)
    client.set_registered_model_alias(name, CHALLENGER, str(version))
    challenger = version_metrics(client, name, version)
    champion = current_version(client, name, CHAMPION)
    if champion == version:
        decision = Decision(False, [f"version {version} is already the champion"])
    else:
        champion_all = version_metrics(client, name, champion) if champion else None
        champion_m = champion_all["tuned"] if champion_all else None
        mine = version_outcomes(client, name, version) or {}
        if champion:
            reference = (version_outcomes(client, name, champion) or {}).get("tuned")
        else:
            reference = mine.get("base")
        live = None
        if champion:
            traffic, empty = live_traffic(p), LiveErrors(0, 0)
            live = tuple(traffic.get(f"{name}-v{v}", empty) for v in (version, champion))
        # the real-schema figure vs the champion's, or the base model's for the first version
        real = challenger.get("real_schema") or {}
        ref_real = (champion_all.get("real_schema") or {}) if champion_all else real
        ref_model = "tuned" if champion_all else "base"
        decision = should_promote(
            challenger["tuned"],
            champion_m,
            challenger["base"],
            p.registry,
            paired_verdicts(mine.get("tuned", {}), reference),
            p.seed,
            live,
            (real.get("tuned"), ref_real.get(ref_model)),
        )
        if decision.promote:
            set_champion(client, name, version)
            champion = version
    mv = client.get_model_version(name, str(version))
    client.set_model_version_tag(
        name, str(version), "gate", "promote" if decision.promote else "keep"
    )
    with mlflow.start_run(run_id=mv.run_id):
        mlflow.log_text(decision.markdown(), f"release/decision-v{version}.md")
    log.info("gate for version %d: %s", version, "; ".join(decision.reasons))
    return ReleaseResult(version, mv.run_id, decision, champion, reused)


def rollback(p: Params, to: int | None = None) -> tuple[int | None, int]:
    """Point `champion` at version `to`, or at the champion before the current one."""
    configure_mlflow(p.mlflow)
    client = MlflowClient()
    name = p.registry.model_name
    current = current_version(client, name, CHAMPION)
    history = _history(client, name)
    if to is None:
        earlier = [v for v in history if v != current]
        if not earlier:
            raise ValueError(f"{name} has no earlier champion to roll back to (history {history})")
        to = earlier[-1]
    # Raises when the version does not exist, or (one line) when its base model is nowhere:
    # the alias must not name a version that cannot be served.
    version_base_dir(p, client, name, to)
    client.set_registered_model_alias(name, CHAMPION, str(to))
    # The rolled-back version leaves the history so a second rollback goes further back.
    kept = [v for v in history if v != current and v != to] + [to]
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(kept))
    if current is not None:
        client.set_model_version_tag(name, str(current), "rolled_back_to", str(to))
    log.info("champion of %s: version %s -> %s", name, current, to)
    return current, to


def list_versions(p: Params) -> list[dict]:
    """Every version of the model with its aliases and lineage tags (the gateway's /v1/models)."""
    configure_mlflow(p.mlflow)
    client = MlflowClient()
    name = p.registry.model_name
    try:
        # search_model_versions leaves `aliases` empty; the registered model maps them.
        aliases = client.get_registered_model(name).aliases
    except MlflowException:
        return []
    out = []
    for mv in client.search_model_versions(f"name = '{name}'"):
        out.append(
            {
                "name": name,
                "version": int(mv.version),
                "aliases": sorted(a for a, v in aliases.items() if str(v) == str(mv.version)),
                "run_id": mv.run_id,
                "created": mv.creation_timestamp,
                "lineage": dict(mv.tags),
            }
        )
    return sorted(out, key=lambda v: v["version"])
