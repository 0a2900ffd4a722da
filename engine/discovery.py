"""Runtimes by name, found through the `engine.runtimes` entry-point group.

The built-in runtimes are registered there by engine's own pyproject.toml like any third-party
package would be (`[project.entry-points."engine.runtimes"] my-runtime = "my_pkg:MyRuntime"`), so
the core never names a runtime. Listing names reads only package metadata; a runtime's module is
imported when that runtime is used (runtime modules keep heavy imports inside methods).
"""
from __future__ import annotations

import configparser
import difflib
import os
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from .errors import EngineError
from .runtime import Runtime

GROUP = "engine.runtimes"


class UnknownRuntime(EngineError, LookupError):
    """No installed package provides a runtime of that name."""


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, metadata.EntryPoint]:
    """The group's entry points, read from each *.dist-info/entry_points.txt on sys.path.

    importlib.metadata.entry_points() builds a Distribution for every installed package (about
    60 ms here); reading only the files that exist keeps a cached `engine apply` instant.
    """
    found: dict[str, metadata.EntryPoint] = {}
    for entry in sys.path:
        try:
            names = sorted(os.listdir(entry or "."))
        except OSError:
            continue
        for name in names:
            if name.endswith((".dist-info", ".egg-info")):
                for point in _read_group(Path(entry or ".") / name / "entry_points.txt"):
                    found.setdefault(point.name, point)  # first on sys.path wins, as for imports
    return found


def _read_group(path: Path) -> list[metadata.EntryPoint]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    if f"[{GROUP}]" not in text:
        return []
    parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # names are case-sensitive
    parser.read_string(text)
    return [metadata.EntryPoint(key.strip(), value.strip(), GROUP) for key, value in parser.items(GROUP)]


def runtime_names() -> list[str]:
    """Names of every installed runtime, sorted."""
    return sorted(_entry_points())


@lru_cache(maxsize=None)
def get_runtime(name: str) -> Runtime:
    """The runtime called `name` (imported on first use)."""
    point = _entry_points().get(name)
    if point is None:
        close = difflib.get_close_matches(name, runtime_names(), n=1)
        raise UnknownRuntime(f"no runtime '{name}' is installed",
                             hint=(f"did you mean '{close[0]}'? " if close else "")
                             + "installed: " + (", ".join(runtime_names()) or "none"))
    cls = point.load()
    if not (isinstance(cls, type) and issubclass(cls, Runtime)):
        raise UnknownRuntime(f"entry point {GROUP}:{name} = {point.value} is not an engine Runtime class")
    runtime = cls()
    if runtime.name != name:
        raise UnknownRuntime(f"entry point {GROUP}:{name} names a runtime called '{runtime.name}'")
    return runtime
