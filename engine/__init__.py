"""engine: declarative YAML recipes for LLM quantization, with a model registry.

    import engine
    model = engine.load("phi35-int4-cpu")          # latest version; "name@2" for a given one
    print(model.generate("Hello", max_new_tokens=32))

Everything is imported lazily so `import engine` costs nothing until used.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load", "apply", "load_recipe", "Registry", "Store", "EngineError", "__version__"]

if TYPE_CHECKING:
    from .pipeline import apply
    from .errors import EngineError
    from .loader import load
    from .recipe import load_recipe
    from .registry import Registry
    from .store import Store

_LAZY = {
    "load": ("loader", "load"),
    "apply": ("pipeline", "apply"),
    "load_recipe": ("recipe", "load_recipe"),
    "Registry": ("registry", "Registry"),
    "Store": ("store", "Store"),
    "EngineError": ("errors", "EngineError"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    return getattr(importlib.import_module(f".{module}", __name__), attr)
