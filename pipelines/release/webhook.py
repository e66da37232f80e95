"""MLflow registry webhooks into the gateway: an alias move in the MLflow UI (or its REST API)
reaches the served model within seconds.

verify_signature(...)  MLflow 3's delivery signature (Standard Webhooks style): header
                       `X-MLflow-Signature: v1,<base64 HMAC-SHA256 of "<delivery id>.<unix
                       timestamp>.<raw body>">` keyed by the webhook's secret, with
                       `X-MLflow-Delivery-Id` and `X-MLflow-Timestamp`; a pure function.
webhook_router(...)    `POST /webhooks/mlflow` for the gateway (outside /v1: MLflow cannot send
                       the API key, the signature stands in for it): unsigned, forged or stale
                       (older than `serving.webhook_max_age_s`) calls get 401; a verified
                       `champion` event only queues a reconcile (controller.py) and returns.
register(...)          the webhook on an MLflow *server* (`make ui` runs `python -m
                       pipelines.release.webhook register`): deliveries come from the server's
                       request handlers only, so a client writing straight to SQLite sends
                       none (the CLI deploys itself; the reconcile loop covers the rest).

The secret is `SQLOPS_WEBHOOK_SECRET` from the environment: the same value for the MLflow
server's registration and the gateway. Without it the endpoint refuses every call.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

log = logging.getLogger(__name__)
SECRET_ENV = "SQLOPS_WEBHOOK_SECRET"
WEBHOOK_NAME = "sqlops-gateway"
EVENTS = ["model_version_alias.created", "model_version_alias.deleted"]
PATH = "/webhooks/mlflow"
SIGNATURE, TIMESTAMP, DELIVERY_ID = (
    "X-MLflow-Signature",
    "X-MLflow-Timestamp",
    "X-MLflow-Delivery-Id",
)


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The `X-MLflow-Signature` value MLflow sends for this delivery."""
    content = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify_signature(
    secret: str | None,
    signature: str | None,
    delivery_id: str | None,
    timestamp: str | None,
    body: bytes,
    now: float,
    max_age_s: float,
) -> str | None:
    """None when the delivery is MLflow's and fresh, else why it is refused."""
    if not secret:
        return f"webhooks are off: {SECRET_ENV} is not set on the gateway"
    if not (signature and delivery_id and timestamp):
        return "unsigned delivery"
    try:
        sent = int(timestamp)
    except ValueError:
        return "malformed timestamp"
    if abs(now - sent) > max_age_s:  # a replay of an old delivery (or a clock far off)
        return f"stale delivery ({now - sent:.0f} s old, limit {max_age_s:.0f} s)"
    expected = sign(secret, delivery_id, timestamp, body)
    # Several space-separated signatures are allowed (secret rotation); one must match.
    if not any(hmac.compare_digest(s.encode(), expected.encode()) for s in signature.split()):
        return "bad signature"
    return None


def is_champion_event(payload: dict, model_name: str, alias: str) -> bool:
    """Whether a delivery moved (or removed) the alias the gateway serves."""
    data = payload.get("data") or {}
    return (
        payload.get("entity") == "model_version_alias"
        and data.get("name") == model_name
        and data.get("alias") == alias
    )


def webhook_router(
    on_champion_moved: Callable[[], None],
    model_name: str,
    alias: str,
    max_age_s: float,
    secret: str | None,
) -> APIRouter:
    """`POST /webhooks/mlflow`: verify, then `on_champion_moved()` (which must not block)."""
    router = APIRouter()

    @router.post(PATH)
    async def mlflow_webhook(request: Request) -> JSONResponse:
        body = await request.body()
        h = request.headers
        refused = verify_signature(
            secret, h.get(SIGNATURE), h.get(DELIVERY_ID), h.get(TIMESTAMP), body, time.time(),
            max_age_s,
        )  # fmt: skip
        if refused is not None:
            log.warning("webhook refused: %s", refused)
            return JSONResponse({"status": "refused", "reason": refused}, status_code=401)
        try:
            payload = json.loads(body)
        except ValueError:
            return JSONResponse({"status": "bad_request", "reason": "not JSON"}, status_code=400)
        if not is_champion_event(payload, model_name, alias):
            return JSONResponse({"status": "ignored"})
        data = payload["data"]
        log.info(
            "webhook: %s@%s %s (v%s)", model_name, alias, payload["action"], data.get("version")
        )
        on_champion_moved()
        return JSONResponse({"status": "queued"}, status_code=202)

    return router


def register(tracking_uri: str, url: str, secret: str) -> str:
    """Create (or replace) the gateway's webhook on the MLflow server at `tracking_uri`;
    returns its id. The server must allow plain-http loopback targets (see the Makefile)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    for hook in client.list_webhooks(max_results=100):
        if hook.name == WEBHOOK_NAME:
            client.delete_webhook(hook.webhook_id)
    hook = client.create_webhook(
        name=WEBHOOK_NAME,
        url=url,
        events=EVENTS,
        secret=secret,
        description="sqlops: the gateway serves whatever `champion` points at",
    )
    return hook.webhook_id


def encryption_key(secret: str) -> str:
    """A Fernet key for MLflow's stored webhook secrets (MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY),
    derived from the webhook secret: without a fixed key MLflow makes a new one per server
    process and can no longer read the secrets it stored before a restart."""
    digest = hashlib.sha256(b"sqlops-mlflow-webhooks:" + secret.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()


def wait_for_server(tracking_uri: str, timeout_s: float) -> None:
    """Until the MLflow server answers /health (it takes 7-33 s to start)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{tracking_uri}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"MLflow server at {tracking_uri} not up after {timeout_s:.0f} s")
        time.sleep(1)


def main() -> None:
    """`register --tracking-uri URI [--url URL]` (make ui) or `encryption-key` (its env)."""
    from pipelines.config import load_params, setup_entry_point

    setup_entry_point()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["register", "encryption-key"])
    ap.add_argument("--tracking-uri", help="the MLflow server, e.g. http://127.0.0.1:5000")
    ap.add_argument("--url", help="the gateway's webhook URL (default: from params.yaml)")
    ap.add_argument("--wait-s", type=float, default=90, help="wait this long for the server")
    args = ap.parse_args()
    secret = os.environ.get("SQLOPS_WEBHOOK_SECRET")
    if not secret:
        raise SystemExit(f"{SECRET_ENV} is not set")
    if args.action == "encryption-key":
        print(encryption_key(secret))
        return
    cfg = load_params().serving
    url = args.url or f"http://{cfg.host}:{cfg.gateway_port}{PATH}"
    wait_for_server(args.tracking_uri, args.wait_s)
    hook_id = register(args.tracking_uri, url, secret)
    print(f"MLflow webhook {hook_id}: {', '.join(EVENTS)} -> {url}")


if __name__ == "__main__":
    main()
