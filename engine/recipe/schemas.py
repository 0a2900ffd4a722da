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


def runtime_schema(runtime: str) -> dict[str, Any] | None:
    """The runtime's own schema, or None when the runtime has none (or the name is not a plain name)."""
    if not _RUNTIME_NAME.match(runtime):
        return None
    if not (schema_dir() / "runtimes" / f"{runtime}.schema.json").is_file():
        return None
    return load_schema(f"runtimes/{runtime}")
