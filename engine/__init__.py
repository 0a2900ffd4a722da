"""engine: declarative YAML recipes for LLM quantization, with a model registry.

    import engine
    engine.apply("recipes/phi35-int4-cpu.yaml")    # a sweep file gives one result per variant
    model = engine.load("phi35-int4-cpu")          # latest version; "name@2" for a given one
    print(model.generate("Hello", max_new_tokens=32))
    engine.verify()                                # every variant's files re-hashed
    engine.gc(dry_run=True)                        # store entries no variant references

Everything is imported lazily so `import engine` costs nothing until used.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load", "apply", "verify", "gc", "load_recipe", "load_recipes", "make_plan", "Registry", "Store",
           "Runtime", "Model", "EngineError", "__version__"]

if TYPE_CHECKING:
    from .collect import gc
    from .errors import EngineError
    from .loader import load
    from .pipeline import apply
    from .plan import make_plan
    from .recipe import load_recipe, load_recipes
    from .registry import Registry
    from .runtime import Model, Runtime
    from .store import Store
    from .verification import verify

_LAZY = {
    "load": ("loader", "load"),
    "apply": ("pipeline", "apply"),
    "verify": ("verification", "verify"),
    "gc": ("collect", "gc"),
    "load_recipe": ("recipe", "load_recipe"),
    "load_recipes": ("recipe", "load_recipes"),
    "make_plan": ("plan", "make_plan"),
    "Registry": ("registry", "Registry"),
    "Store": ("store", "Store"),
    "Runtime": ("runtime", "Runtime"),
    "Model": ("runtime", "Model"),
    "EngineError": ("errors", "EngineError"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    return getattr(importlib.import_module(f".{module}", __name__), attr)
