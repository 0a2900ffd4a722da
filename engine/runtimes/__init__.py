"""Runtimes by name, imported only when used (their modules keep heavy imports inside methods)."""
from __future__ import annotations

import importlib
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


def library_versions(runtime: Runtime) -> dict[str, str]:
    """Installed versions of the distributions that change a runtime's output (no imports)."""
    versions = {}
    for dist in runtime.distributions:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            raise RuntimeUnavailable(
                f"runtime '{runtime.name}' needs the Python package '{dist}', which is not installed",
                hint=f"pip install 'engine[{EXTRAS.get(runtime.name, 'all')}]'",
            ) from None
    return versions


__all__ = ["Model", "Runtime", "get_runtime", "library_versions", "names", "EXTRAS"]
