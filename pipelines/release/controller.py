"""The registry drives serving: whoever moves `champion` (sqlops, the MLflow UI, its REST API, a
flow), the gateway's served version follows, through the one deploy path (deploy.py).

reconcile(p, ...)  under the deploy lock: the registry's champion vs the routed version; deploy
                   the champion when they differ (`needs_deploy`), then read the champion again,
                   so of two quick alias moves the last one wins.
ReconcileLoop      the gateway process's background thread (pipelines/release/server.py): a
                   reconcile every `serving.reconcile_s` (the safety net: webhooks are
                   fire-and-forget, a gateway that was down missed them) and at once when a
                   verified MLflow webhook asks (webhook.py). It never blocks a request. Its
                   last result is a block of `/health` and two Prometheus gauges
                   (`sqlops_served_version`, `sqlops_registry_champion_version`); with
                   `serving.shadow_share` it also keeps the `challenger` loaded for shadow
                   traffic and names its route to the gateway.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from prometheus_client import CollectorRegistry, Gauge

from pipelines.config import Params
from pipelines.release.deploy import (
    MlflowRegistry,
    Registry,
    deploy,
    deploy_lock,
    served_route,
)
from pipelines.serving.routing import Route, adapter_name, read_route, shares_base
from pipelines.serving.service import Text2SQL
from pipelines.serving.vllm_server import AdapterServer, MergedServer, ModelServer, serves_merged

log = logging.getLogger(__name__)
MAX_ROUNDS = 5  # deploys per reconcile while the alias keeps moving (then the next tick)


@dataclass
class ReconcileResult:
    champion: int | None  # the registry's champion after the reconcile
    served: int | None  # the routed version after it
    action: str  # in_sync | deployed | rolled_back | failed
    error: str | None = None  # why a deploy failed or was rolled back
    ts: float = 0.0  # unix seconds of the check

    @property
    def in_sync(self) -> bool:
        return self.champion == self.served

    def as_dict(self) -> dict:
        return asdict(self) | {"in_sync": self.in_sync}


def needs_deploy(served: int | None, champion: int | None) -> bool:
    """Whether the gateway must move: the registry names a champion it does not serve (no
    champion at all leaves whatever is served alone)."""
    return champion is not None and served != champion


def served_version(p: Params) -> int | None:
    route = read_route(p.path("routing"))
    return route.version if route else None


def gateway_model_server(p: Params) -> ModelServer:
    """The model server as the gateway process may use it: the running vLLM (a vLLM that is
    down is `sqlops serve`'s to start, the deploy fails and is retried; one on another base
    than the champion's is restarted on it), or with merged serving the restarting one."""
    return MergedServer(p) if serves_merged(p) else AdapterServer(p)


def reconcile(
    p: Params,
    *,
    server: ModelServer | None = None,
    registry: Registry | None = None,
    service: Text2SQL | None = None,
) -> ReconcileResult:
    """Serve the registry's champion when the route names another version."""
    registry = registry or MlflowRegistry(p)
    action, error = "in_sync", None
    with deploy_lock(p):
        for _ in range(MAX_ROUNDS):
            champion, served = registry.champion(), served_version(p)
            if not needs_deploy(served, champion):
                break
            log.info("champion is v%s, the gateway serves v%s: deploying", champion, served)
            try:
                r = deploy(
                    p, champion, server=server or gateway_model_server(p),
                    registry=registry, service=service,
                )  # fmt: skip
            except Exception as e:  # the model server is away: the next tick tries again
                log.warning("deploying v%s failed: %s", champion, e)
                action, error = "failed", f"{type(e).__name__}: {e}"
                break
            action = "deployed" if r.ok else "rolled_back"
            error = None if r.ok else "; ".join(r.smoke.failures[:3])
            if not r.ok:  # the alias went back by itself; serving it again is the next tick's
                break
        return ReconcileResult(registry.champion(), served_version(p), action, error, time.time())


class ReconcileLoop:
    """A background thread that reconciles every `serving.reconcile_s` and on `trigger()`.

    `registry_factory`/`server_factory` give the MLflow registry and the model server (tests
    pass stand-ins); `challenger` reads the registry's challenger version for shadow traffic."""

    def __init__(
        self,
        p: Params,
        service: Text2SQL | None = None,
        registry_factory: Callable[[], Registry] | None = None,
        server_factory: Callable[[], ModelServer] | None = None,
        challenger: Callable[[], int | None] | None = None,
        metrics: CollectorRegistry | None = None,
    ):
        self.p, self.service = p, service
        self.registry_factory = registry_factory or (lambda: MlflowRegistry(p))
        self.server_factory = server_factory or (lambda: gateway_model_server(p))
        self.challenger = challenger
        self.last: ReconcileResult | None = None
        self.shadow: Route | None = None  # the challenger's route while shadow traffic is on
        self._apart: int | None = None  # a challenger left without shadow: on another base
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._registry: Registry | None = None
        r = metrics or CollectorRegistry()
        self.served_gauge = Gauge(
            "sqlops_served_version", "Registry version the gateway serves (0: none)", registry=r
        )
        self.champion_gauge = Gauge(
            "sqlops_registry_champion_version", "Registry champion version (0: none)", registry=r
        )
        self.in_sync_gauge = Gauge(
            "sqlops_registry_in_sync", "1 when the served version is the champion", registry=r
        )

    def trigger(self) -> None:
        """Ask for a reconcile now (a webhook arrived); returns at once."""
        self._wake.set()

    def run_once(self) -> ReconcileResult:
        try:
            if self._registry is None:
                self._registry = self.registry_factory()
            server = self.server_factory()
            result = reconcile(self.p, server=server, registry=self._registry, service=self.service)
        except Exception as e:  # the registry is away: reported, retried on the next tick
            log.warning("reconcile failed: %s", e)
            self._registry = None
            result = ReconcileResult(None, served_version(self.p), "failed", str(e), time.time())
        else:
            try:
                self._keep_shadow(server, result)
            except Exception as e:  # shadow traffic is optional: off until the next tick
                log.warning("shadow traffic off: %s", e)
                self.shadow = None
        self.last = result
        self.served_gauge.set(result.served or 0)
        self.champion_gauge.set(result.champion or 0)
        self.in_sync_gauge.set(int(result.in_sync))
        return result

    def _keep_shadow(self, server: ModelServer, result: ReconcileResult) -> None:
        """The challenger loaded beside the champion while `serving.shadow_share` > 0 (adapter
        serving only: a merged vLLM serves one model; and only on the champion's base, which
        vLLM serves)."""
        cfg = self.p.serving
        version = self.challenger() if self.challenger and cfg.shadow_share > 0 else None
        if version is None or version == result.served or serves_merged(self.p):
            self.shadow = None
            return
        name = adapter_name(self.p.registry.model_name, version)
        base = self._registry.base_path(version)
        if not shares_base(read_route(self.p.path("routing")), base):
            if version != self._apart:  # said once per challenger
                log.info("no shadow traffic: %s is on another base model than the champion", name)
            self.shadow, self._apart = None, version
            return
        if self.shadow is None or self.shadow.version != version:
            path = self._registry.adapter_path(version)
            server.serve(name, path, base)
            self.shadow = served_route(self.p, name, version, path, base)
            log.info("shadow traffic: %.0f%% of requests also to %s", 100 * cfg.shadow_share, name)

    def health(self) -> dict:
        """The `registry` block of the gateway's /health."""
        if self.last is None:
            return {"status": "not checked yet"}
        out = self.last.as_dict()
        out["shadow"] = self.shadow.model if self.shadow else None
        return out

    def _run(self) -> None:
        period = self.p.serving.reconcile_s
        while not self._stop.is_set():
            self._wake.clear()  # before the check: a webhook arriving during it runs another
            self.run_once()
            self._wake.wait(timeout=period if period > 0 else None)

    def start(self) -> ReconcileLoop:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="reconcile", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None
