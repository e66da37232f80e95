"""The production parts from Debian packages, as throwaway servers for tests on 127.0.0.1: a
PostgreSQL 15 cluster (`initdb` + `pg_ctl` under a temp folder, run as the `postgres` user when
we are root) and Prometheus 2 (temp storage). Each is stopped by its PID and its folder removed.

`python -m tests.system_servers` lists what is missing and exits 1 (`make infra-check` runs it
first, so a machine without the packages fails there instead of skipping).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

DEBIAN_PACKAGES = "chromium chromium-driver postgresql prometheus"
INSTALL = f"apt-get install -y {DEBIAN_PACKAGES}"


def postgres_bin() -> Path | None:
    """Debian's server binaries (/usr/lib/postgresql/<major>/bin, newest), else initdb on PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def missing() -> list[str]:
    """The programs these servers and the browser test need that are not installed."""
    need = {"prometheus": shutil.which("prometheus"), "promtool": shutil.which("promtool")}
    need["initdb (postgresql)"] = postgres_bin()
    need["chromium"] = Path("/usr/bin/chromium").is_file() or None
    need["chromedriver (chromium-driver)"] = Path("/usr/bin/chromedriver").is_file() or None
    return [name for name, where in need.items() if not where]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(pid: int, sig: int = signal.SIGTERM, timeout_s: float = 20) -> None:
    """Signal one process and wait until it is gone (ours, or the postmaster we started)."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


class PostgresCluster:
    """A fresh cluster with password auth, listening on 127.0.0.1 only; `env` holds libpq's
    PG* variables, as compose.yaml gives them to the services."""

    def __init__(self, databases: tuple[str, ...] = ("inference", "mlflow")):
        self.databases = databases
        self.user, self.password = "sqlops", secrets.token_hex(12)
        self.port = 0
        self.pid: int | None = None
        self.root: Path | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            "PGHOST": "127.0.0.1",
            "PGPORT": str(self.port),
            "PGUSER": self.user,
            "PGPASSWORD": self.password,
            "PGDATABASE": self.databases[0],
        }

    def url(self, database: str, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _run(self, *cmd: str | Path) -> None:
        # initdb refuses to run as root: as root, the cluster belongs to `postgres`.
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *map(str, cmd)], check=True, capture_output=True, text=True)

    def start(self) -> PostgresCluster:
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise FileNotFoundError(f"PostgreSQL is not installed: {INSTALL}")
        # Not pytest's tmp_path: its parents are private to our user, unreadable to `postgres`.
        self.root = Path(tempfile.mkdtemp(prefix="sqlops-pg-"))
        (self.root / "pw").write_text(self.password + "\n")
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            for path in (self.root, self.root / "pw"):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        data = self.root / "data"
        self._run(
            bin_dir / "initdb", "-D", data, "-U", self.user, "--pwfile", self.root / "pw",
            "--auth", "scram-sha-256", "-E", "UTF8", "--locale", "C.UTF-8",
        )  # fmt: skip
        self.port = free_port()
        options = f"-k {self.root} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            bin_dir / "pg_ctl", "-D", data, "-l", self.root / "server.log", "-o", options,
            "-w", "-t", "60", "start",
        )  # fmt: skip
        self.pid = int((data / "postmaster.pid").read_text().split()[0])
        import psycopg2

        conn = psycopg2.connect(**self._connect_args("postgres"))
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with conn.cursor() as cur:
            for name in self.databases:
                cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return self

    def _connect_args(self, database: str) -> dict:
        return {
            "host": "127.0.0.1",
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "dbname": database,
        }

    def query(self, database: str, sql: str) -> list[tuple]:
        """Rows of a query, read straight from the server (not through the code under test)."""
        import psycopg2

        with psycopg2.connect(**self._connect_args(database)) as conn, conn.cursor() as cur:
            cur.execute(sql)
            rows = cur.fetchall()
        conn.close()
        return rows

    def stop(self) -> None:
        if self.pid is not None:
            _stop(self.pid, signal.SIGINT)  # SIGINT: the postmaster's "fast" shutdown
            self.pid = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


class Prometheus:
    """A Prometheus server on 127.0.0.1 with its own temp storage, from a config file."""

    def __init__(self, config: Path):
        self.config, self.port = config, 0
        self.proc: subprocess.Popen | None = None
        self.storage: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30) -> Prometheus:
        self.storage = Path(tempfile.mkdtemp(prefix="sqlops-prometheus-"))
        self.port = free_port()
        cmd = [
            "prometheus",
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.storage}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        log = (self.storage / "prometheus.log").open("w")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready after {timeout_s} s: {self.log()}")

    def log(self) -> str:
        path = self.storage / "prometheus.log" if self.storage else None
        return path.read_text()[-2000:] if path and path.is_file() else ""

    def query(self, expr: str) -> dict:
        """The instant query API's `data` (raises with Prometheus' error when it fails)."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        if body.get("status") != "success":
            raise ValueError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc.pid)
            self.proc.wait(timeout=5)
            self.proc = None
        if self.storage is not None:
            shutil.rmtree(self.storage, ignore_errors=True)
            self.storage = None


if __name__ == "__main__":
    gone = missing()
    if gone:
        print(f"missing: {', '.join(gone)}; install with: {INSTALL}", file=sys.stderr)
    sys.exit(1 if gone else 0)
