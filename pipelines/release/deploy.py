"""Deployment: put a registered adapter behind the gateway.

deploy(p, version)  copy the version's adapter out of MLflow (once, immutable) → make vLLM serve
                    it as `<model>-v<N>` → route the gateway to it → smoke test (canary
                    questions must give SQL that executes) → on failure the route and the
                    `champion` alias return to the previous version by themselves (the reason
                    tagged `deploy_failed` on the failed version, so the MLflow UI shows why)
                    → unload adapters beyond `serving.keep_adapters`.

Every way a deploy can end leaves the route and the alias agreeing (or the alias on the last
good version, which the reconcile loop of pipelines/release/controller.py serves again): a
smoke test that crashes counts as failed; a revert whose own reload fails leaves nothing routed
rather than the failed version; a first deploy that fails removes the alias it could not serve.
A model server that is down is not the version's fault: the alias stays and the deploy is
retried. `deploy_lock(p)` serialises deploys across processes (CLI, gateway).

"Make vLLM serve it" is the model server's `serve(name, adapter, base)` (pipelines/serving/
vllm_server.py), on the version's own base model (pipelines/model/base_store.py): a runtime
LoRA load into a running vLLM (no restart, unless the version's base is another one than vLLM
serves), or with `serving.merged` a restart of vLLM on the adapter merged into its base.

The model server, the registry and the smoke-test service are arguments with real defaults,
so tests run the whole sequence against a local stand-in. Called by `sqlops deploy|serve|
rollback` and by flows/release.py; nothing here runs in DVC.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx

from pipelines.config import Params
from pipelines.serving.backend import vllm_url
from pipelines.serving.routing import Route, adapter_name, read_route, write_route
from pipelines.serving.service import Text2SQL, service_from_params
from pipelines.serving.vllm_server import (
    ModelServer,
    model_server,
    serves_merged,
    start_background,
)

log = logging.getLogger(__name__)
SMOKE_FAILURE_DB = "__forced_smoke_failure__"  # a canary that cannot pass (drills, tests)
FAILURE_TAG = "deploy_failed"  # on a version that failed to deploy: when and why (the UI shows it)


class Registry(Protocol):
    def champion(self) -> int | None: ...
    def set_champion(self, version: int) -> None: ...
    def clear_champion(self) -> None: ...
    def adapter_path(self, version: int) -> Path: ...
    # The version's base-model folder (pipelines/model/base_store.py); None: it names none
    def base_path(self, version: int) -> Path | None: ...
    def note_failure(self, version: int, reason: str) -> None: ...


class MlflowRegistry:
    """The MLflow side: the champion alias and each version's adapter as a local folder."""

    def __init__(self, p: Params):
        from mlflow import MlflowClient
        from pipelines.tracking import configure_mlflow

        self.p = p
        configure_mlflow(p.mlflow)
        self.client = MlflowClient()

    def champion(self) -> int | None:
        from pipelines.release.registry import CHAMPION, current_version

        return current_version(self.client, self.p.registry.model_name, CHAMPION)

    def set_champion(self, version: int) -> None:
        from pipelines.release.registry import rollback

        rollback(self.p, to=version)

    def clear_champion(self) -> None:
        from pipelines.release.registry import CHAMPION

        self.client.delete_registered_model_alias(self.p.registry.model_name, CHAMPION)

    def note_failure(self, version: int, reason: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        name = self.p.registry.model_name
        self.client.set_model_version_tag(
            name, str(version), FAILURE_TAG, f"{stamp}: {reason}"[:5000]
        )

    def base_path(self, version: int) -> Path | None:
        """The version's own base model: stored here, or fetched from MLflow (BaseUnavailable,
        one line, when it is nowhere)."""
        from pipelines.model.base_store import version_base_dir

        return version_base_dir(self.p, self.client, self.p.registry.model_name, version)

    def adapter_path(self, version: int) -> Path:
        """`<paths.served_adapters>/<model>-v<N>/`, copied out of the registered model once. A
        marker names the version's source, so a folder left by another registry is never
        reused."""
        import mlflow

        name = self.p.registry.model_name
        target = self.p.path("served_adapters") / adapter_name(name, version)
        source = self.client.get_model_version(name, str(version)).source
        marker = target / ".registered_source"
        if marker.is_file() and marker.read_text() == source:
            return target
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            uri = f"models:/{name}/{version}"
            local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=tmp))
            found = next(local.rglob("adapter_config.json"), None)
            if found is None:
                raise FileNotFoundError(f"{name} version {version} holds no LoRA adapter")
            shutil.copytree(found.parent, target)
        marker.write_text(source)
        return target


@dataclass
class SmokeResult:
    passed: bool
    n_ok: int
    n: int
    failures: list[str] = field(default_factory=list)


@dataclass
class DeployResult:
    version: int
    name: str
    smoke: SmokeResult | None
    rolled_back_to: int | None = None  # set when the smoke test failed and we went back
    unloaded: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.smoke is None or self.smoke.passed


def canaries(p: Params, n: int) -> list[dict]:
    """`n` training questions, one database after another: schemas the model was tuned on, so
    a correctly served adapter answers them with SQL that executes (deterministic)."""
    by_db: dict[str, list[dict]] = {}
    with (p.path("prepared") / "train.jsonl").open() as f:
        for line in f:
            rec = json.loads(line)
            by_db.setdefault(rec["db_id"], []).append(
                {"question": rec["question"], "db_id": rec["db_id"]}
            )
    rounds = zip(*by_db.values(), strict=False)
    return [q for batch in rounds for q in batch][:n]


def smoke_test(
    service: Text2SQL, route: Route, questions: list[dict], min_pass: float
) -> SmokeResult:
    """Each canary through the gateway's own request path; passes when enough SQL executes."""

    async def run() -> list:
        return [
            await service.answer(q["question"], q["db_id"], True, route, use_cache=False)
            for q in questions
        ]

    answers = asyncio.run(run())
    failures = [
        f"{q['db_id']}: {q['question'][:60]!r} -> {a.row['status']}: {a.row.get('error')}"
        for q, a in zip(questions, answers, strict=True)
        if a.row["status"] != "ok"
    ]
    n_ok = len(questions) - len(failures)
    passed = bool(questions) and n_ok >= min_pass * len(questions)
    return SmokeResult(passed, n_ok, len(questions), failures)


def prune(server: ModelServer, model_name: str, keep: int, routed: str) -> list[str]:
    """Unload our adapters beyond the newest `keep` (the routed one always stays)."""
    pattern = re.compile(rf"^{re.escape(model_name)}-v(\d+)$")
    ours = sorted(
        (n for n in server.loaded() if pattern.match(n)),
        key=lambda n: int(pattern.match(n).group(1)),
        reverse=True,
    )
    kept = [routed] + [n for n in ours if n != routed][: max(keep - 1, 0)]
    gone = [n for n in ours if n not in kept]
    for n in gone:
        server.unload(n)
    return gone


def deploy(
    p: Params,
    version: int | None = None,
    *,
    server: ModelServer | None = None,
    registry: Registry | None = None,
    service: Text2SQL | None = None,
    force_smoke_failure: bool = False,
) -> DeployResult:
    """Serve `version` (default: the champion); roll back by itself when the smoke test fails."""
    cfg = p.serving
    registry = registry or MlflowRegistry(p)
    server = server or model_server(p)
    version = version or registry.champion()
    if version is None:
        raise ValueError("no champion to deploy: run `sqlops release` first")
    routing = p.path("routing")
    name = adapter_name(p.registry.model_name, version)
    previous = read_route(routing)
    service = service or service_from_params(p, cache=False)
    questions = canaries(p, cfg.smoke_questions)
    try:
        path, base = registry.adapter_path(version), registry.base_path(version)
        server.serve(name, path, base)  # on another base than the running one: a restart
        route = served_route(p, name, version, path, base)
        # The first batch in a vLLM process (LoRA's above all) is very slow: pay it before
        # users are routed here.
        smoke_test(service, route, questions[:1], 0.0)
    except Exception as e:
        if not server.healthy():
            raise  # the model server is away, not the version's fault: retried later
        # Nothing was routed yet: users stay on the previous version, and so does the alias.
        reason = f"could not load {name}: {type(e).__name__}: {e}"
        log.error("%s", reason)
        registry.note_failure(version, reason)
        smoke = SmokeResult(False, 0, 0, [reason])
        to = previous.version if previous and previous.version != version else None
        _alias_back(registry, version, to)
        return DeployResult(version, name, smoke, rolled_back_to=to)
    write_route(routing, route)
    log.info("routed the gateway to %s (was %s)", name, previous.model if previous else None)

    if force_smoke_failure:
        questions = [{"question": "forced smoke failure", "db_id": SMOKE_FAILURE_DB}]
    try:
        smoke = smoke_test(service, route, questions, cfg.smoke_min_pass)
    except Exception as e:  # a crash is a failed smoke test: the route must not stay here
        log.exception("smoke test of %s crashed", name)
        smoke = SmokeResult(
            False, 0, len(questions), [f"smoke test crashed: {type(e).__name__}: {e}"]
        )
    log.info("smoke test of %s: %d/%d canaries executed", name, smoke.n_ok, smoke.n)
    result = DeployResult(version, name, smoke)
    if not smoke.passed:
        for failure in smoke.failures:
            log.warning("smoke failure: %s", failure)
        reason = f"smoke test {smoke.n_ok}/{smoke.n}: " + "; ".join(smoke.failures[:3])
        registry.note_failure(version, reason)
        result.rolled_back_to = revert(p, server, registry, routing, failed=route, to=previous)
        return result
    result.unloaded = prune(server, p.registry.model_name, cfg.keep_adapters, name)
    return result


def revert(
    p: Params,
    server: ModelServer,
    registry: Registry,
    routing: Path,
    failed: Route,
    to: Route | None,
) -> int | None:
    """Route back to the previous version (loaded again, or vLLM restarted on it when merged)
    and move `champion` back with it. Returns the version routed again (None: nothing is)."""
    if to is not None and to.version == failed.version:
        log.error("smoke test of the version already served failed; routing left as it was")
        return None
    if to is None:
        routing.unlink(missing_ok=True)  # nothing served before: the gateway answers 503
        log.error("smoke test failed and there is no previous version to return to")
        _alias_back(registry, failed.version, None)
        return None
    try:
        path, base = registry.adapter_path(to.version), registry.base_path(to.version)
        server.serve(to.model, path, base)  # an adapter is still loaded unless pruned
    except Exception:
        # A version that failed its smoke test is never left serving: 503s until the reconcile
        # loop serves the alias (moved back below) again.
        log.exception("reloading %s failed: nothing is routed", to.model)
        routing.unlink(missing_ok=True)
        _alias_back(registry, failed.version, to.version)
        return None
    write_route(routing, served_route(p, to.model, to.version, path, base))
    _alias_back(registry, failed.version, to.version)
    with contextlib.suppress(Exception):  # merged serving already dropped it with the restart
        server.unload(failed.model)
    log.warning("rolled back: serving %s again, champion v%d", to.model, to.version)
    return to.version


def _alias_back(registry: Registry, failed: int, to: int | None) -> None:
    """`champion` onto the last good version, or removed when there is none: the registry
    must not name a champion that cannot be served."""
    champion = registry.champion()
    if to is not None and champion != to:
        registry.set_champion(to)
    elif to is None and champion == failed:
        registry.clear_champion()
        log.error("champion alias removed from v%d: no earlier served version", failed)


@contextlib.contextmanager
def deploy_lock(p: Params) -> Iterator[None]:
    """One deploy at a time on this machine (an advisory file lock: the CLI and the gateway's
    reconcile loop are different processes)."""
    path = p.path("deploy_lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_serving(p: Params) -> bool:
    """Whether a model is being served: the gateway has a route and its vLLM answers (then a
    promotion is deployed at once)."""
    from pipelines.serving.vllm_server import VLLMAdmin

    return read_route(p.path("routing")) is not None and VLLMAdmin(vllm_url(p.serving)).healthy()


def served_route(
    p: Params, name: str, version: int, adapter: Path, base: Path | None = None
) -> Route:
    """The route to a served version, naming its base model (whose tokenizer builds the
    prompt). With merged serving it names no adapter: the gateway must not try to load a LoRA
    into a vLLM that serves merged weights (a 404 there is a 503)."""
    lora = None if serves_merged(p) else str(adapter)
    return Route(name, version, time.time(), lora, str(base) if base else None)


def route_to(p: Params, version: int, server: ModelServer, registry: Registry) -> Route:
    """Serve `version` now (after `sqlops rollback` moved the alias, or after vLLM restarted)
    and route to it."""
    name = adapter_name(p.registry.model_name, version)
    path, base = registry.adapter_path(version), registry.base_path(version)
    server.serve(name, path, base)
    route = served_route(p, name, version, path, base)
    write_route(p.path("routing"), route)
    log.info("routed the gateway to %s", name)
    return route


def serve(p: Params, background: bool) -> int:
    """vLLM (started if needed) serving the routed version (the champion on first use) +
    gateway."""
    import sys

    from pipelines.release.controller import reconcile

    cfg = p.serving
    route = read_route(p.path("routing"))
    registry = MlflowRegistry(p)
    champion = registry.champion()
    if route is None and champion is None:
        raise ValueError("no champion to serve: run `sqlops release` first")
    # vLLM (when it is started here) starts on the champion's base: no restart to serve it.
    server = model_server(p, registry.base_path(champion) if champion else None)
    # The champion, not the last route: the alias may have moved while nothing was serving.
    result = reconcile(p, server=server, registry=registry)
    route = read_route(p.path("routing"))
    if route is None:
        log.error("nothing to serve (%s); not starting the gateway", result.error or "no route")
        return 1
    if route.model not in server.loaded():  # vLLM was (re)started: the version is not on it
        route_to(p, route.version, server, registry)
    url = f"http://{cfg.host}:{cfg.gateway_port}"
    gateway = [sys.executable, "-m", "pipelines.release.server"]
    if not background:  # in the foreground until Ctrl-C; vLLM keeps running
        return subprocess.run(gateway, check=False).returncode
    run_dir = p.path("run_dir")
    pid = start_background("gateway", gateway, dict(os.environ), run_dir)
    deadline = time.monotonic() + cfg.gateway_startup_timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                weights = "merged weights" if serves_merged(p) else "runtime LoRA adapters"
                print(f"gateway: {url} (pid {pid}, log {run_dir}/gateway.log)")
                print(f"vLLM: {server.root}: {route.model}, {weights} (merged: {cfg.merged})")
                print("stop both with: sqlops serve --stop (or make serve-stop)")
                return 0
        except httpx.HTTPError:
            pass
        time.sleep(1)
    log.error(
        "gateway not healthy after %.0f s; see %s/gateway.log",
        cfg.gateway_startup_timeout_s,
        run_dir,
    )
    return 1
