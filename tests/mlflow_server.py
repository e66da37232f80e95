"""A real `mlflow server` on loopback for the registry-serving tests: SQLite store in a temp
folder, its own process group (its job consumers can outlive SIGTERM to the parent), stopped
by PID. Webhooks to loopback need `MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true` and plain http
`MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https`, as in `make ui`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pipelines.release.webhook import encryption_key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root: Path, secret: str, startup_timeout_s: float = 120.0):
        self.root, self.secret, self.timeout_s = root, secret, startup_timeout_s
        self.port = free_port()
        self.db = root / "mlflow.db"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def store_uri(self) -> str:
        return f"sqlite:///{self.db}"

    def start(self) -> MlflowServer:
        env = dict(os.environ)
        env.pop("MLFLOW_TRACKING_URI", None)
        env |= {
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
            "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
            "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": encryption_key(self.secret),
            "MLFLOW_WEBHOOK_CACHE_TTL": "1",  # tests re-register the webhook within a minute
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        mlflow = Path(sys.executable).with_name("mlflow")
        cmd = [
            str(mlflow), "server", "--backend-store-uri", self.store_uri,
            "--default-artifact-root", (self.root / "artifacts").as_uri(),
            "--artifacts-destination", (self.root / "artifacts").as_uri(),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        log = (self.root / "mlflow-server.log").open("ab")
        self.proc = subprocess.Popen(
            cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.root / "mlflow-server.log").read_text()[-2000:]
                raise RuntimeError(f"mlflow server did not start:\n{tail}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """The call the MLflow UI's alias editor makes."""
        r = httpx.post(
            f"{self.url}/api/2.0/mlflow/registered-models/alias",
            json={"name": name, "alias": alias, "version": str(version)},
            timeout=10,
        )
        r.raise_for_status()
