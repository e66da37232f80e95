"""Every version keeps its own base model: bases stored once per weights hash (a folder and an
MLflow run), resolved per version, and served on it. Two tiny base models with different
weights (tests/conftest.py `two_bases`), a version on each, the champion alias moved back and
forth (as the MLflow UI writes it, and through `sqlops rollback`), each version served by the
vLLM stand-in run as a process (tests/fake_vllm.py: a switch of base is a real restart) with its
route and prompt on its own base; a version whose base is nowhere is a one-line error."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import httpx
import pytest

import mlflow
from mlflow import MlflowClient
from pipelines.config import load_params
from pipelines.model.base_store import (
    EXPERIMENT,
    BaseRef,
    BaseUnavailable,
    base_dir_for,
    read_info,
    store_base,
    store_folder,
)
from pipelines.release.controller import reconcile
from pipelines.release.deploy import MlflowRegistry, deploy
from pipelines.release.registry import CHAMPION, current_version, rollback
from pipelines.serving import vllm_server
from pipelines.serving.routing import read_route
from pipelines.serving.vllm_server import AdapterServer, stop_background
from pipelines.tracking import configure_mlflow
from tests.conftest import GAME_QA, SHOP_QA
from tests.mlflow_server import free_port
from tests.test_deploy_merged import merged  # noqa: F401  (fixture)

NAME = "text2sql"


def weights_hash(base: Path) -> str:
    return read_info(base)["weights_sha256"]


def test_a_base_is_stored_once_per_hash_and_found_wherever_it_is(tmp_path, two_bases, mlflow_cfg):
    a, b = two_bases
    store = tmp_path / "bases"
    p = load_params().replace(paths={"base_model": a, "base_models": store})
    p = p.model_copy(update={"mlflow": mlflow_cfg})
    configure_mlflow(p.mlflow)
    client = MlflowClient()
    ref = store_base(p, client)
    folder = store_folder(store, ref.hash)
    assert (ref.id, ref.hash) == ("tiny-a", weights_hash(a)) and ref.uri.startswith("runs:/")
    weights = folder / "model.safetensors"
    assert weights.read_bytes() == (a / "model.safetensors").read_bytes()
    assert store_base(p, client) == ref  # logged once: the run is reused
    exp = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags["base_model_hash"] == ref.hash and run.data.tags["licence"] == "test-only"

    # paths.base_model now holds another base: the version's is still in the store ...
    assert base_dir_for(ref, b, store) == folder
    # ... and with the store gone, in MLflow (downloaded into the store, hash checked).
    shutil.rmtree(store)
    assert base_dir_for(ref, b, store) == folder and weights_hash(folder) == ref.hash
    # paths.base_model holding the version's base is enough (it is stored on the way).
    shutil.rmtree(store)
    assert base_dir_for(BaseRef("tiny-a", ref.hash), a, store) == folder

    wrong = BaseRef("tiny-b", weights_hash(b), ref.uri)  # the copy holds other weights
    with pytest.raises(BaseUnavailable, match=f"holds weights {ref.hash[:12]}"):
        base_dir_for(wrong, a, store)
    gone = BaseRef("gone-model", "f" * 64)
    with pytest.raises(BaseUnavailable) as e:
        base_dir_for(gone, b, store)
    message = str(e.value)
    assert "\n" not in message and "gone-model (weights ffffffffffff)" in message
    assert f"{b} has weights {weights_hash(b)[:12]}" in message and "no MLflow copy" in message
    deleted = BaseRef("gone-model", "f" * 64, "runs:/0123456789abcdef/base")
    with pytest.raises(BaseUnavailable, match="could not be fetched"):
        base_dir_for(deleted, b, store)


# --- serving across bases: runtime LoRA (vLLM restarted on the version's base) ---------------


def fake_vllm_command(port: int, tmp: Path):
    """The vLLM stand-in as a process with runtime LoRA on `base`, logging every request."""
    answers = tmp / "answers.json"
    answers.write_text(json.dumps({q: sql for q, sql, *_ in SHOP_QA + GAME_QA}))

    def command(base: Path) -> list[str]:
        return [
            sys.executable, "-m", "tests.fake_vllm", "--port", str(port), "--model", str(base),
            "--answers", str(answers), "--lora", "--requests", str(tmp / "requests.jsonl"),
        ]  # fmt: skip

    return command


def add_version(p, client: MlflowClient, base: Path | None, tag: int, ref=None) -> int:
    """A registered version whose tags name its base as `register` writes them (the adapter
    is any folder: the stand-in loads it)."""
    if ref is None:
        ref = store_base(p.replace(paths={"base_model": base}), client)
    adapter = p.path("run_dir").parent / f"adapter-{tag}"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "tag": tag}))
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(adapter), "text2sql/adapter")
    source = f"{run.info.artifact_uri}/text2sql"
    mv = client.create_model_version(NAME, source, run_id=run.info.run_id)
    for k, v in ref.tags().items():
        client.set_model_version_tag(NAME, mv.version, k, v)
    return int(mv.version)


@pytest.fixture
def lora(tmp_path, prepared_dir, two_bases, mlflow_cfg, monkeypatch):
    """(params, server, client, bases): v1 on base A, v2 on base B, paths.base_model = B, the
    store emptied (A comes back from MLflow); vLLM started on B."""
    monkeypatch.delenv("SQLOPS_VLLM_URL", raising=False)
    a, b = two_bases
    port = free_port()
    p = load_params().replace(
        serving={"merged": False, "vllm_port": port, "smoke_questions": 2,
                 "vllm_startup_timeout_s": 60},
        paths={"prepared": prepared_dir, "base_model": b, "base_models": tmp_path / "bases",
               "served_adapters": tmp_path / "served", "routing": tmp_path / "routing.json",
               "deploy_lock": tmp_path / "deploy.lock", "run_dir": tmp_path / "run"},
    )  # fmt: skip
    p = p.model_copy(update={"mlflow": mlflow_cfg})
    configure_mlflow(p.mlflow)
    client = MlflowClient()
    client.create_registered_model(NAME)
    assert [add_version(p, client, base, i) for i, base in enumerate((a, b), 1)] == [1, 2]
    shutil.rmtree(p.path("base_models"))
    command = fake_vllm_command(port, tmp_path)
    # `sqlops rollback` builds its own server: the stand-in's command line in vLLM's place.
    monkeypatch.setattr(vllm_server.AdapterServer, "_vllm_command", lambda _, base: command(base))
    server = AdapterServer(p).start()
    try:
        yield p, server, client, (a, b)
    finally:
        stop_background("vllm", p.path("run_dir"))


def last_prompt(p) -> str:
    lines = (p.path("run_dir").parent / "requests.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["prompt"]


def served_on(p, server, version: int, base: Path) -> None:
    """The route names `version` on its own base, which vLLM serves, and the last prompt was
    built with that base's tokenizer (a chat template on A, none on B)."""
    route = read_route(p.path("routing"))
    stored = store_folder(p.path("base_models"), weights_hash(base))
    assert (route.version, route.base_path) == (version, str(stored))
    assert server.base() == str(stored) and f"{NAME}-v{version}" in server.loaded()
    chat = "<|im_start|>system\n" in last_prompt(p)  # (the plain layout starts with BOS only)
    assert chat is base.name.startswith("base_a")


def test_the_alias_moved_back_and_forth_serves_each_version_on_its_base(lora, capsys, monkeypatch):
    from flows import cli

    p, server, client, (a, b) = lora
    pid = (p.path("run_dir") / "vllm.pid").read_text()
    registry = MlflowRegistry(p)
    rollback(p, to=1)  # champion v1, on base A: fetched from MLflow, vLLM restarted on it
    r = reconcile(p, server=server, registry=registry)
    assert (r.action, r.served) == ("deployed", 1), r.error
    served_on(p, server, 1, a)
    assert (p.path("run_dir") / "vllm.pid").read_text() != pid

    client.set_registered_model_alias(NAME, CHAMPION, "2")  # what the MLflow UI writes
    r = reconcile(p, server=server, registry=registry)
    assert (r.action, r.served) == ("deployed", 2), r.error
    served_on(p, server, 2, b)

    monkeypatch.setattr(cli, "load_params", lambda: p)
    assert cli.main(["rollback", "--to", "1"]) == 0
    assert "gateway serves v1, champion v1 (deployed)" in capsys.readouterr().out
    served_on(p, server, 1, a)

    # A version whose base is nowhere: one line, and the alias stays where it was.
    add_version(p, client, None, 3, ref=BaseRef("gone-model", "f" * 64))
    assert cli.main(["rollback", "--to", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sqlops rollback: text2sql v3: base model gone-model")
    assert err.count("\n") == 1 and current_version(client, NAME, CHAMPION) == 1
    # `sqlops eval` says the same before it reads any data.
    argv = ["eval", "--dataset", "spider:/nowhere", "--model", "models:/text2sql/3"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("sqlops eval: text2sql v3: base model gone-model")
    assert err.count("\n") == 1


def test_the_gateway_reloads_an_adapter_only_onto_its_own_base(lora):
    """vLLM switched to another version's base: a request still routed to the old version is
    a 503 until the route follows (its adapter is never loaded onto the other base)."""
    import asyncio

    from pipelines.serving.backend import BackendUnavailable, VLLMCompletions

    p, server, _, (a, b) = lora
    registry = MlflowRegistry(p)
    rollback(p, to=1)
    reconcile(p, server=server, registry=registry)
    old = read_route(p.path("routing"))
    server.serve(f"{NAME}-v2", registry.adapter_path(2), registry.base_path(2))  # a restart
    backend = VLLMCompletions(f"{server.root}/v1", 5.0, 8)
    request = [{"n": 1, "temperature": 0.0, "max_tokens": 8}]
    with pytest.raises(BackendUnavailable, match="runs base model"):
        asyncio.run(backend.candidates(old.model, "x", request, old.adapter_path, old.base_path))
    assert f"{NAME}-v1" not in server.loaded()


def test_shadow_and_challenger_stay_off_across_bases(lora):
    from pipelines.release.controller import ReconcileLoop
    from pipelines.release.server import challenger_route

    p, server, client, _ = lora
    p = p.replace(serving={"shadow_share": 1.0})
    registry = MlflowRegistry(p)
    rollback(p, to=1)
    client.set_registered_model_alias(NAME, "challenger", "2")
    loop = ReconcileLoop(
        p,
        registry_factory=lambda: registry,
        server_factory=lambda: server,
        challenger=lambda: 2,
    )
    assert loop.run_once().served == 1
    assert loop.shadow is None and server.base() == read_route(p.path("routing")).base_path
    assert challenger_route(p)() is None  # the playground's side by side: not on this vLLM


# --- merged serving: each version merged into its own base ----------------------------------


def test_merged_serving_merges_each_version_into_its_own_base(merged, two_bases):  # noqa: F811
    p, server, registry, service, _ = merged
    a, b = two_bases
    registry.bases = {1: a, 2: b}
    for version, base in ((1, a), (2, b), (1, a)):
        registry.set_champion(version)
        r = deploy(p, server=server, registry=registry, service=service)
        assert r.ok and server.loaded() == [f"{NAME}-v{version}"]
        (model,) = httpx.get(f"{server.root}/v1/models").json()["data"]
        info = json.loads((Path(model["root"]) / "merge_info.json").read_text())
        assert info["base_model"] == str(base)
        assert read_route(p.path("routing")).base_path == str(base)


# --- a registered version (pyfunc) and `sqlops eval` after paths.base_model changed ----------


@pytest.mark.slow
def test_a_registered_version_loads_on_its_own_base_after_the_base_changed(
    tmp_path, two_bases, prepared_dir, mlflow_cfg
):
    import pandas as pd

    from pipelines.eval import external
    from pipelines.model.base import load_base
    from pipelines.model.generate import generate_sql
    from pipelines.model.prompt import build_prompt
    from pipelines.release.registry import release
    from tests.test_evaluate_release import _fake_eval, _params, _train

    a, b = two_bases
    p = _params(tmp_path, a, prepared_dir, mlflow_cfg)
    _train(p)
    _fake_eval(p, base_ex=0.1, tuned_ex=0.5)
    assert release(p).champion == 1
    mv = MlflowClient().get_model_version(NAME, "1")
    assert mv.tags["base_model"] == "tiny-a" and mv.tags["base_model_uri"].startswith("runs:/")
    # The next run trains on base B: paths.base_model is rebuilt, and this machine's store is
    # gone (a version registered elsewhere): v1 still loads, on A, fetched from MLflow.
    on_b = p.replace(paths={"base_model": b})
    shutil.rmtree(p.path("base_models"))
    label, load, info = external.model_loader("models:/text2sql/1", on_b, tmp_path / "eval")
    spec = load()
    stored = store_folder(p.path("base_models"), weights_hash(a))
    assert (info["version"], spec.base_dir) == (1, stored)
    loaded = mlflow.pyfunc.load_model(
        "models:/text2sql@champion",
        model_config={"base_model_path": str(b), "base_store_path": str(p.path("base_models"))},
    )
    rows = pd.DataFrame({"question": ["How many players are there?"], "ddl": ["CREATE TABLE "
                         "players (player_id INTEGER PRIMARY KEY, level INTEGER);"]})  # fmt: skip
    model, tok = load_base(a, p.path("adapter"))
    prompts = [build_prompt(rows["ddl"][0], rows["question"][0], tok)]
    assert list(loaded.predict(rows)) == generate_sql(model, tok, prompts, 4, 8).sql


def test_a_versions_tags_carry_its_base_and_licence_both_ways():
    ref = BaseRef("google/gemma-3-270m", "a" * 64, "runs:/0123/base", "Gemma Terms of Use")
    tags = ref.tags()
    assert tags["base_model_licence"] == "Gemma Terms of Use" and tags["base_model"] == ref.id
    assert BaseRef.from_tags(tags) == ref
    assert "base_model_licence" not in BaseRef("tiny", "b" * 64).tags()
