"""Find and load the JSON schemas, which live outside the package in a checkout but inside it in a wheel."""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import engine

_RUNTIME_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")  # keeps a runtime name from escaping the folder


def schema_dir() -> Path:
    """``engine/schemas`` in an installed wheel (force-included there), else ``<repo>/schemas``."""
    package = Path(engine.__file__).resolve().parent
    inside = package / "schemas"
    return inside if inside.is_dir() else package.parent / "schemas"


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict[str, Any]:
    """Schema ``<name>.schema.json`` under :func:`schema_dir` (e.g. ``recipe``, ``runtimes/onnxruntime-genai``).

    Cached and shared: callers must not mutate the result.
    """
    path = schema_dir() / f"{name}.schema.json"
    return json.loads(path.read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def recipe_schema() -> dict[str, Any]:
    """The common recipe schema, with target.runtime's enum listing the installed runtimes.

    Cached and shared: callers must not mutate the result.
    """
    import copy

    from engine.discovery import runtime_names

    doc = copy.deepcopy(load_schema("recipe"))
    doc["properties"]["target"]["properties"]["runtime"]["enum"] = runtime_names()
    return doc


@lru_cache(maxsize=None)
def runtime_schema(runtime: str) -> dict[str, Any] | None:
    """The runtime's own schema (its declaration's enums filled in), or None for an unknown name.

    Cached and shared: callers must not mutate the result.
    """
    from engine.discovery import get_runtime, runtime_names

    if not _RUNTIME_NAME.match(runtime) or runtime not in runtime_names():
        return None
    return get_runtime(runtime).schema()
