"""Runtimes by name, imported only when used (their modules keep heavy imports inside methods)."""
from __future__ import annotations

import importlib
import os
import re
import sys
from functools import lru_cache
from importlib import metadata

from ..errors import RuntimeUnavailable
from .base import Model, Runtime

_RUNTIMES: dict[str, str] = {
    "onnxruntime-genai": "engine.runtimes.ortgenai:OrtGenAIRuntime",
    "openvino": "engine.runtimes.openvino:OpenVINORuntime",
    "itrex": "engine.runtimes.itrex:ItrexRuntime",
}

#: the pip extra that installs each runtime, for error hints
EXTRAS: dict[str, str] = {"onnxruntime-genai": "ortgenai", "openvino": "openvino", "itrex": "itrex"}


def names() -> list[str]:
    return sorted(_RUNTIMES)


def get_runtime(name: str) -> Runtime:
    module_name, _, cls_name = _RUNTIMES[name].partition(":")
    return getattr(importlib.import_module(module_name), cls_name)()


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


@lru_cache(maxsize=1)
def _dist_info_versions() -> dict[str, str]:
    """name -> version from the *.dist-info folder names on sys.path: one listing per folder,
    where importlib.metadata.version() walks sys.path again for every name (a cached apply asks
    for about ten)."""
    found: dict[str, str] = {}
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.endswith(".dist-info"):
                dist, _, version = name[: -len(".dist-info")].partition("-")
                found.setdefault(_normalize(dist), version)
    return found


def installed_version(dist: str) -> str:
    """The installed version of a distribution; PackageNotFoundError when it is absent."""
    version = _dist_info_versions().get(_normalize(dist))
    return version if version else metadata.version(dist)


def library_versions(runtime: Runtime) -> dict[str, str]:
    """Installed versions of the distributions that change a runtime's output (no imports)."""
    versions = {}
    for dist in runtime.distributions:
        try:
            versions[dist] = installed_version(dist)
        except metadata.PackageNotFoundError:
            raise RuntimeUnavailable(
                f"runtime '{runtime.name}' needs the Python package '{dist}', which is not installed",
                hint=f"pip install 'engine[{EXTRAS.get(runtime.name, 'all')}]'",
            ) from None
    return versions


__all__ = ["Model", "Runtime", "get_runtime", "installed_version", "library_versions", "names", "EXTRAS"]
