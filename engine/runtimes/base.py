"""The small interface every runtime implements, and the model object users get back.

A runtime says which library versions change its output (they enter the cache key), turns a
validated recipe into the parameters that determine the artifact (nothing else enters the key, so
a description change never rebuilds), builds an artifact from a source folder, and loads one.
Runtime modules import their heavy libraries inside methods, never at module level.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

Progress = Callable[[str], None]


class Model(ABC):
    """What `engine.load()` returns, whatever the runtime."""

    def __init__(self, info: dict, native: Any) -> None:
        self.info = info  # the registry record of the variant
        self.native = native  # the runtime's own object, for anything the engine does not wrap

    @property
    def name(self) -> str:
        return f"{self.info['name']}@{self.info['version']}"

    @abstractmethod
    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 64,
        *,
        do_sample: bool = False,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
    ) -> str:
        """Continue `prompt`; returns only the new text (greedy unless do_sample)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} runtime={self.info['runtime']}>"


class Runtime(ABC):
    name: str
    #: bump when the engine's own build code changes what it writes (part of the cache key)
    step_version: int = 1
    #: distributions whose versions change the artifact bytes (part of the cache key)
    distributions: tuple[str, ...] = ()
    #: files to fetch from a hub repository for a build
    source_patterns: tuple[str, ...] = (
        "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken",
    )

    @abstractmethod
    def build_params(self, recipe: dict, base_dir: Path) -> dict:
        """The normalized parameters that determine the artifact (JSON-able)."""

    def check_available(self, recipe: dict) -> None:
        """Raise RuntimeUnavailable when this machine cannot build/run the recipe's target."""

    @abstractmethod
    def build(self, source_dir: Path, out_dir: Path, params: dict, logs_dir: Path,
              progress: Progress) -> dict:
        """Write the artifact into `out_dir`; return facts worth recording (JSON-able)."""

    @abstractmethod
    def load(self, artifact_dir: Path, info: dict, **options: Any) -> Model:
        """Open a built artifact."""
