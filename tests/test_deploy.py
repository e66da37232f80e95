"""Deployment against the vLLM stand-in: load under immutable names, route, smoke test, roll
back by itself on failure, unload beyond `keep`, and a hot swap under load with zero failures."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pipelines.config import load_params
from pipelines.release.deploy import deploy, prune, route_to
from pipelines.serving.backend import VLLMCompletions
from pipelines.serving.gateway import create_app
from pipelines.serving.inference_log import InferenceLog
from pipelines.serving.routing import RouteWatcher, read_route
from pipelines.serving.service import Text2SQL
from pipelines.serving.vllm_server import VLLMAdmin
from tests.conftest import GAME_QA
from tests.fake_vllm import FakeVLLM
from tests.loopback import LoopbackServer


class FakeRegistry:
    def __init__(self, root: Path, champion: int | None):
        self.root, self._champion, self.moves = root, champion, []
        self.failures: dict[int, str] = {}  # version -> reason (MLflow: the deploy_failed tag)
        self.bases: dict[int, Path] = {}  # version -> its base-model folder (none: unnamed)

    def champion(self) -> int | None:
        return self._champion

    def set_champion(self, version: int) -> None:
        self._champion = version
        self.moves.append(version)

    def clear_champion(self) -> None:
        self._champion = None
        self.moves.append(None)

    def note_failure(self, version: int, reason: str) -> None:
        self.failures[version] = reason

    def adapter_path(self, version: int) -> Path:
        path = self.root / f"v{version}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def base_path(self, version: int) -> Path | None:
        return self.bases.get(version)


@pytest.fixture
def env(tmp_path, prepared_dir, tiny_base_dir):
    """(params, vLLM stand-in, admin, registry, smoke service) around the 20-row fixture."""
    from transformers import AutoTokenizer

    p = load_params().replace(
        serving={"merged": False, "keep_adapters": 2, "smoke_questions": 3},  # runtime adapters
        paths={
            "prepared": prepared_dir,
            "routing": tmp_path / "routing.json",
            "deploy_lock": tmp_path / "deploy.lock",
        },
    )
    serving = p.serving
    with FakeVLLM({q: sql for q, sql, *_ in GAME_QA}) as fake:
        backend = VLLMCompletions(fake.base_url, 2.0, 64)
        tok = AutoTokenizer.from_pretrained(tiny_base_dir)
        service = Text2SQL(serving, prepared_dir / "databases", tok, backend)
        yield p, fake, VLLMAdmin(fake.base_url), FakeRegistry(tmp_path / "adapters", 1), service


def run_deploy(env, version=None, **kw):
    p, _, admin, registry, service = env
    return deploy(p, version, server=admin, registry=registry, service=service, **kw)


def test_deploy_loads_routes_and_smoke_tests(env):
    p, fake, admin, *_ = env
    r = run_deploy(env)
    assert r.ok and (r.version, r.name) == (1, "text2sql-v1")
    assert r.smoke.n_ok == r.smoke.n == 3
    assert read_route(p.path("routing")).model == "text2sql-v1"
    assert admin.loaded() == ["text2sql-v1"]
    assert fake.calls["text2sql-v1"] == 4  # warm-up + 3 canaries


def test_older_adapters_beyond_keep_are_unloaded(env):
    _, _, admin, *_ = env
    for v in (1, 2, 3):
        r = run_deploy(env, v)
    assert r.ok and r.unloaded == ["text2sql-v1"]
    assert sorted(admin.loaded()) == ["text2sql-v2", "text2sql-v3"]
    assert prune(admin, "text2sql", keep=1, routed="text2sql-v2") == ["text2sql-v3"]


def test_failed_smoke_test_rolls_back_route_and_alias(env):
    p, fake, admin, registry, _ = env
    run_deploy(env, 1)
    registry.set_champion(2)  # the gate promoted v2 ...
    fake.fail_for.add("text2sql-v2")  # ... whose adapter answers nothing useful
    r = run_deploy(env)
    assert not r.ok and r.rolled_back_to == 1
    assert r.smoke.n_ok == 0 and "backend_error" in r.smoke.failures[0]
    assert read_route(p.path("routing")).model == "text2sql-v1"
    assert registry.champion() == 1 and admin.loaded() == ["text2sql-v1"]


def test_forced_smoke_failure_rolls_back(env):
    p, _, _, registry, _ = env
    run_deploy(env, 1)
    registry.set_champion(2)
    r = run_deploy(env, force_smoke_failure=True)
    assert r.rolled_back_to == 1 and registry.moves == [2, 1]
    assert read_route(p.path("routing")).version == 1


def test_first_deploy_failing_leaves_nothing_routed_and_no_champion(env):
    p, _, _, registry, _ = env
    r = run_deploy(env, force_smoke_failure=True)
    assert not r.ok and r.rolled_back_to is None
    assert read_route(p.path("routing")) is None
    # The alias named a version nothing serves: it is removed, the reason is on the version.
    assert registry.champion() is None and "smoke test 0/1" in registry.failures[1]


def test_route_to_after_a_registry_rollback(env):
    p, _, admin, registry, _ = env
    run_deploy(env, 2)
    route_to(p, 1, admin, registry)
    assert read_route(p.path("routing")).model == "text2sql-v1"
    assert "text2sql-v1" in admin.loaded()


def test_hot_swap_under_load_fails_no_request(env, tmp_path):
    p, fake, _, _, service = env
    run_deploy(env, 1)
    fake.delay_s = 0.01
    ilog = InferenceLog(f"sqlite:///{tmp_path}/inference.db")
    app = create_app(service, ilog, RouteWatcher(p.path("routing")))
    questions = [q for q, *_ in GAME_QA]
    stop, results = threading.Event(), []

    def client_loop(i: int) -> None:
        with httpx.Client(timeout=10) as c:
            n = 0
            while not stop.is_set():
                q = f"{questions[(i + n) % len(questions)]} #{i}-{n}"  # no cache hits
                r = c.post(f"{gw.url}/v1/sql", json={"question": q, "db_id": "game"})
                results.append((r.status_code, r.json().get("model_version")))
                n += 1

    with LoopbackServer(app) as gw, ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client_loop, i) for i in range(4)]
        for v in (2, 3, 4):
            assert run_deploy(env, v).ok
        stop.set()
        for f in futures:
            f.result()
    assert len(results) > 20
    assert [s for s, _ in results if s != 200] == []
    assert {m for _, m in results} >= {"text2sql-v1", "text2sql-v4"}


@pytest.mark.slow
def test_mlflow_registry_gives_champion_and_immutable_adapter_copy(
    tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg
):
    from pipelines.release.deploy import MlflowRegistry
    from pipelines.release.registry import list_versions, release
    from tests.test_evaluate_release import _fake_eval, _params, _train

    p = _params(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg, "a1")
    served = tmp_path / "served"
    p = p.replace(paths={"served_adapters": served})
    _train(p)
    _fake_eval(p, base_ex=0.1, tuned_ex=0.5)
    release(p)
    reg = MlflowRegistry(p)
    assert reg.champion() == 1
    path = reg.adapter_path(1)
    assert path == served / "text2sql-v1"
    weights = "adapter_model.safetensors"
    assert (path / weights).read_bytes() == (p.path("adapter") / weights).read_bytes()
    assert reg.adapter_path(1) == path  # copied once; the folder is the version's for good
    (version,) = list_versions(p)
    assert sorted(version["aliases"]) == ["challenger", "champion"]
    assert {"git_commit", "data_hash", "base_model_hash"} <= set(version["lineage"])
