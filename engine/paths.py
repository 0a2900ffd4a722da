"""Where the registry and the store live unless told otherwise.

registry: --registry, else $ENGINE_REGISTRY, else ./registry.db
store:    --store,    else $ENGINE_STORE,    else .engine/ beside the registry
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Locations:
    registry: Path
    store: Path


def resolve(registry: str | Path | None = None, store: str | Path | None = None) -> Locations:
    reg = Path(registry or os.environ.get("ENGINE_REGISTRY") or "registry.db").absolute()
    st = Path(store or os.environ.get("ENGINE_STORE") or reg.parent / ".engine").absolute()
    return Locations(reg, st)
