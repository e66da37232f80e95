"""The house's layers point only down: each package of `pipelines/` imports only its own layer
or the ones below it, and the library never imports the orchestration layer (`flows/`)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A package may import its own layer and any lower one.
LAYERS = [
    {
        "config",
        "sql",
        "sql_worker",
        "db_schema",
        "inferred_joins",
        "lineage",
        "tracking",
        "vllm_runtime",
    },  # facts, tools
    {"data"},  # records, sources, synth, prepare, validate
    {"model"},  # prompt, base, train, generation backends
    {"eval"},  # scoring, judge, evaluation stage
    {"serving"},  # the request path, gateway app, inference log, vLLM server
    {"release", "monitoring"},  # registry + deploy onto serving; drift over the inference log
    {"bench"},  # drivers that train, evaluate and serve to compare
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "pipelines":  # `from pipelines import sql`
                found += [(node.lineno, f"pipelines.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def violations(root: Path) -> list[str]:
    bad = []
    for path in sorted((root / "pipelines").rglob("*.py")):
        rel = path.relative_to(root)
        part = rel.parts[1].removesuffix(".py")
        if part == "__init__":
            continue
        for line, module in imports(path):
            where = f"{rel}:{line} imports {module}"
            if module == "flows" or module.startswith("flows."):
                bad.append(f"{where} (the library must not import the flows)")
            elif module.startswith("pipelines."):
                target = module.split(".")[1]
                if target not in LAYER or part not in LAYER:
                    bad.append(f"{where} (unknown layer: add it to LAYERS)")
                elif LAYER[target] > LAYER[part]:
                    bad.append(f"{where} (layer {LAYER[target]} above {LAYER[part]})")
    return bad


def test_pipelines_imports_point_only_down():
    assert violations(ROOT) == []


def test_the_walk_catches_an_upward_import(tmp_path):
    (tmp_path / "pipelines" / "data").mkdir(parents=True)
    (tmp_path / "pipelines" / "data" / "x.py").write_text(
        "from pipelines.serving.gateway import create_app\nimport flows.cli\n"
    )
    found = violations(tmp_path)
    assert len(found) == 2 and "layer 4 above 1" in found[0] and "flows" in found[1]
