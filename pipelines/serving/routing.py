"""Which version the gateway serves: a small JSON file that `sqlops deploy` writes and the
gateway re-reads when it changes, so a switch needs no restart of either process.

The file holds the served name (`<model>-v<N>`, immutable: a new version never reuses a name,
so vLLM can never answer from a stale cached adapter; with `serving.merged` it is vLLM's
`--served-model-name`), the registry version behind it, and the folder of its base model.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Route:
    model: str  # served adapter name in vLLM, e.g. "text2sql-v3"
    version: int  # MLflow model version behind it
    updated: float = 0.0  # unix seconds of the switch
    # Lets the gateway reload the adapter into a restarted vLLM; None with merged serving.
    adapter_path: str | None = None
    # The version's base-model folder: its tokenizer builds the prompt (chat templates differ
    # per base). None: the configured base (route files written before versions kept theirs).
    base_path: str | None = None


def adapter_name(model_name: str, version: int) -> str:
    return f"{model_name}-v{version}"


def shares_base(route: Route | None, base: Path | None) -> bool:
    """Whether a version on `base` can be loaded beside the routed one (runtime LoRA: one vLLM
    serves one base). A side that names no base is on the configured one."""
    if route is None or route.base_path is None or base is None:
        return True
    return Path(route.base_path).resolve() == Path(base).resolve()


def write_route(path: Path, route: Route) -> None:
    """Atomically replace the routing file (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    data = asdict(route) | {"updated": route.updated or time.time()}
    tmp.write_text(json.dumps(data) + "\n")
    tmp.replace(path)


def read_route(path: Path) -> Route | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return Route(
        model=data["model"],
        version=int(data["version"]),
        updated=data["updated"],
        adapter_path=data.get("adapter_path"),
        base_path=data.get("base_path"),
    )


class RouteWatcher:
    """The current route, re-read only when the file's mtime changes."""

    def __init__(self, path: Path):
        self.path = path
        self._mtime: float | None = None
        self._route: Route | None = None

    def current(self) -> Route | None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._mtime, self._route = None, None
            return None
        if mtime != self._mtime:
            self._route, self._mtime = read_route(self.path), mtime
        return self._route
