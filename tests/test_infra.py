"""infra/ holds together: every manifest parses; compose services, k8s objects, the vLLM flags,
the Prometheus/Grafana metric names and the production params agree with the code; every
environment variable a manifest sets is one the code reads or a known third-party one."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.config import ROOT, load_params
from pipelines.serving.vllm_server import vllm_command

INFRA = ROOT / "infra"
P = load_params()

# Read by the images and libraries themselves, not by our code (what reads each).
THIRD_PARTY_ENV = {
    "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB",  # postgres image
    "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",  # minio / mc
    "PGHOST", "PGUSER", "PGPASSWORD", "PGDATABASE",  # libpq (psycopg2): the inference log
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL",  # MLflow's S3 store
    "MLFLOW_DISABLE_TELEMETRY",  # MLflow
    "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "MLFLOW_WEBHOOK_ALLOWED_SCHEMES",  # MLflow webhooks
    "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY",
    "PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_SERVER_UI_API_URL", "PREFECT_HOME",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_CPU_KVCACHE_SPACE", "VLLM_TARGET_DEVICE",
    "VLLM_NO_USAGE_STATS",  # vLLM
    "HF_HUB_OFFLINE",  # huggingface_hub
    "GF_SECURITY_ADMIN_PASSWORD",  # Grafana
    "PYTHONUNBUFFERED",  # CPython
}  # fmt: skip
_READS = re.compile(
    r'(?:environ\.get|environ\.setdefault|getenv)\(\s*"([A-Z0-9_]+)"|environ\["([A-Z0-9_]+)"\]'
)


def code_env_names() -> set[str]:
    names = set()
    for path in [*(ROOT / "pipelines").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]:
        for a, b in _READS.findall(path.read_text()):
            names.add(a or b)
    return names


def load_yaml(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


COMPOSE = load_yaml(INFRA / "compose.yaml")[0]
SERVICES = COMPOSE["services"]
K8S = {
    (d["kind"], d["metadata"]["name"]): d
    for f in sorted((INFRA / "k8s").glob("*.yaml"))
    if f.name not in ("kustomization.yaml", "params.production.yaml")
    for d in load_yaml(f)
}
KUSTOMIZATION = load_yaml(INFRA / "k8s" / "kustomization.yaml")[0]


def test_every_manifest_parses():
    files = [f for f in INFRA.rglob("*") if f.suffix in (".yaml", ".yml", ".json")]
    assert len(files) >= 12
    for f in files:
        docs = json.loads(f.read_text()) if f.suffix == ".json" else load_yaml(f)
        assert docs, f"{f} is empty"


def env_of(env) -> list[str]:
    return list(env) if isinstance(env, dict) else [e.split("=", 1)[0] for e in env or []]


def manifest_env_names() -> dict[str, str]:
    """Variable name -> where a manifest sets it."""
    found = {}
    for name, svc in SERVICES.items():
        found |= dict.fromkeys(env_of(svc.get("environment")), f"compose {name}")
    for (kind, name), doc in K8S.items():
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []):
            found |= {e["name"]: f"{kind} {name}" for e in c.get("env", [])}
    for gen in KUSTOMIZATION["configMapGenerator"] + KUSTOMIZATION["secretGenerator"]:
        found |= {lit.split("=")[0]: gen["name"] for lit in gen.get("literals", [])}
        for env_file in gen.get("envs", []):
            example = INFRA / "k8s" / f"{env_file}.example"
            for line in example.read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    found[line.split("=")[0]] = str(example.name)
    for line in (INFRA / "Dockerfile").read_text().splitlines():
        if line.startswith("ENV "):
            found |= {kv.split("=")[0]: "Dockerfile" for kv in line[4:].split()}
    return found


def test_every_environment_variable_is_read_by_the_code_or_known():
    ours = code_env_names()
    assert {"SQLOPS_VLLM_URL", "SQLOPS_API_KEY", "MLFLOW_TRACKING_URI", "PREFECT_API_URL"} <= ours
    names = manifest_env_names()
    assert {"SQLOPS_API_KEY", "SQLOPS_VLLM_URL", "PGPASSWORD"} <= set(names)
    unknown = {n: where for n, where in names.items() if n not in ours | THIRD_PARTY_ENV}
    assert not unknown, f"set in manifests but read by nothing we know: {unknown}"


def test_compose_services_images_volumes_and_dependencies():
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", (INFRA / "Dockerfile").read_text(), re.M))
    image_of_target: dict[str, str] = {}
    for name, svc in SERVICES.items():
        assert "image" in svc, f"{name}: no image"
        if "build" in svc:
            b = svc["build"]
            assert (INFRA / b["context"] / b["dockerfile"]).resolve() == INFRA / "Dockerfile"
            assert b["target"] in targets, f"{name}: no stage {b['target']} in the Dockerfile"
            # One image name per build target: compose would otherwise build it twice.
            assert image_of_target.setdefault(b["target"], svc["image"]) == svc["image"]
        for dep in svc.get("depends_on", []):
            assert dep in SERVICES, f"{name} depends on unknown {dep}"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).exists(), f"{name}: {source} missing"
            else:
                assert source in COMPOSE["volumes"], f"{name}: volume {source} not declared"
    assert image_of_target["sqlops"] == SERVICES["gateway"]["image"]


def test_compose_commands_exist_in_the_code():
    stages = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    for name, svc in SERVICES.items():
        cmd = svc.get("command")
        if not isinstance(cmd, list) or svc.get("image") != "sqlops:latest":
            continue
        if cmd[:2] == ["python", "-m"]:
            assert importlib.util.find_spec(cmd[2]), f"{name}: no module {cmd[2]}"
        elif cmd[:2] == ["dvc", "repro"]:
            assert set(cmd[2:]) <= stages, f"{name}: unknown DVC stages {cmd[2:]}"
        elif cmd[0] == "sqlops":  # the subcommand parses (argparse exits 2 when it does not)
            run = [sys.executable, "-m", "flows.cli", *cmd[1:], "--help"]
            assert subprocess.run(run, capture_output=True, cwd=ROOT).returncode == 0, name
        elif cmd[:2] == ["mlflow", "server"]:
            from mlflow.cli import server

            options = {o for param in server.params for o in param.opts}
            flags = {c for c in cmd[2:] if c.startswith("--")}
            assert flags <= options, f"mlflow server has no {flags - options}"
        else:
            assert cmd[:3] == ["prefect", "server", "start"], f"{name}: unchecked {cmd}"


def flag_pairs(args: list[str]) -> dict[str, str | None]:
    """`--flag value` / `--flag` pairs of a command line."""
    out = {}
    for i, a in enumerate(args):
        if a.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) else None
            out[a] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def test_vllm_flags_match_the_local_server_and_params():
    # The containers serve runtime adapters (their gateway has SQLOPS_VLLM_URL: auto = false).
    local = flag_pairs(vllm_command(P.replace(serving={"merged": False})))
    # --dtype follows the hardware (vllm.dtype auto): bf16 on the GPU images, fp32 by default
    # on the CPU image (SQLOPS_VLLM_DTYPE for hosts with native bf16).
    expected = {k: v for k, v in local.items() if k not in ("--model", "--host", "--dtype")}
    k8s = K8S[("Deployment", "vllm")]["spec"]["template"]["spec"]["containers"][0]
    for where, args, dtype in (
        ("compose vllm", SERVICES["vllm"]["command"], "bfloat16"),
        ("compose vllm-cpu", SERVICES["vllm-cpu"]["command"], "${SQLOPS_VLLM_DTYPE:-float32}"),
        ("k8s vllm", k8s["args"], "bfloat16"),
    ):
        got = flag_pairs(args)
        assert {k: got.get(k, "missing") for k in expected} == expected, where
        assert got.get("--dtype") == dtype, where
        assert "/app/models/base" in args, where  # same path as the worker's adapters
    assert k8s["image"] == SERVICES["vllm"]["image"]
    port = str(P.serving.vllm_port)
    assert SERVICES["gateway"]["environment"]["SQLOPS_VLLM_URL"] == f"http://vllm:{port}/v1"
    assert (
        f"SQLOPS_VLLM_URL=http://vllm:{port}/v1"
        in KUSTOMIZATION["configMapGenerator"][1]["literals"]
    )
    cpu_kv = SERVICES["vllm-cpu"]["environment"]["VLLM_CPU_KVCACHE_SPACE"]
    assert cpu_kv == str(P.vllm.kvcache_gb)


def test_k8s_probes_services_volumes_and_config():
    pvcs = {n for k, n in K8S if k == "PersistentVolumeClaim"}
    configmaps = {g["name"] for g in KUSTOMIZATION["configMapGenerator"]}
    secrets = {g["name"] for g in KUSTOMIZATION["secretGenerator"]}
    assert {(k, n) for k, n in K8S} >= {("Deployment", "gateway"), ("Service", "gateway")}
    for res in KUSTOMIZATION["resources"]:
        assert (INFRA / "k8s" / res).is_file(), res
    for gen in KUSTOMIZATION["configMapGenerator"]:
        for f in gen.get("files", []):
            assert (INFRA / "k8s" / f.split("=")[-1]).is_file(), f
    for (kind, name), doc in K8S.items():
        if kind not in ("Deployment", "Job"):
            continue
        pod = doc["spec"]["template"]["spec"]
        for v in pod.get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in pvcs, (name, v)
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, (name, v)
        for c in pod["containers"]:
            for ref in c.get("envFrom", []):
                assert (ref.get("configMapRef") or {}).get("name", "sqlops-env") in configmaps
                assert (ref.get("secretRef") or {}).get("name", "sqlops-secrets") in secrets
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            if ports:  # a server: ready only when /health says so
                probe = c["readinessProbe"]["httpGet"]
                assert probe["path"] == "/health" and probe["port"] in ports, name
                service = K8S[("Service", name)]
                assert service["spec"]["selector"] == doc["spec"]["selector"]["matchLabels"]
                assert all(p["targetPort"] in ports for p in service["spec"]["ports"])
    gateway = K8S[("Deployment", "gateway")]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["ports"][0]["containerPort"] == P.serving.gateway_port
    assert gateway["command"] == SERVICES["gateway"]["command"]


def test_production_params_differ_from_params_yaml_only_where_documented():
    prod = load_params(INFRA / "k8s" / "params.production.yaml")  # a valid, complete params file
    assert prod.serving.host == "0.0.0.0"
    assert prod.serving.inference_log_url == "postgresql+psycopg2://"

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        return out

    dev = flat(P.model_dump(mode="json"))
    changed = {k for k, v in flat(prod.model_dump(mode="json")).items() if dev[k] != v}
    # merged: false there, auto here (the vLLM pod is on the GPU node, not the gateway's).
    assert changed == {"serving.host", "serving.inference_log_url", "serving.merged"}


def test_dashboard_and_prometheus_use_the_gateway_metric_names():
    from prometheus_client import generate_latest

    from pipelines.serving.service import GatewayMetrics

    m = GatewayMetrics()
    m.requests.labels("ok").inc()
    m.latency.observe(0.2)
    for counter in (m.guard_rejections, m.cache_hits, m.backend_errors):
        counter.inc()
    exposed = {
        re.split(r"[{ ]", line)[0]
        for line in generate_latest(m.registry).decode().splitlines()
        if line and not line.startswith("#")
    } | {family.name for family in m.registry.collect()}  # e.g. the histogram's own name
    dashboard = json.loads((INFRA / "grafana" / "dashboards" / "sqlops-gateway.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"sqlops_gateway_\w+", e)}
    prom_text = (INFRA / "prometheus" / "prometheus.yml").read_text()
    used |= set(re.findall(r"sqlops_gateway_\w+", prom_text))
    assert len(used) >= 5 and used <= exposed, used - exposed
    assert any("histogram_quantile(0.95" in e for e in exprs)
    datasource = load_yaml(INFRA / "grafana/provisioning/datasources/prometheus.yaml")[0]
    uids = {d["uid"] for d in datasource["datasources"]}
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} <= uids
    jobs = yaml.safe_load(prom_text)["scrape_configs"]
    targets = [t for job in jobs for s in job["static_configs"] for t in s["targets"]]
    assert f"gateway:{P.serving.gateway_port}" in targets


@pytest.mark.parametrize(
    ("uri", "local"),
    [("sqlite:///mlflow/mlflow.db", True), ("http://mlflow:5000", False), ("https://m.io", False)],
)
def test_experiment_artifacts_go_to_the_server_store_with_a_tracking_server(uri, local):
    from pipelines.tracking import artifact_location

    location = artifact_location(P.mlflow, uri)
    assert (location == ROOT / P.mlflow.artifact_location) if local else location is None
