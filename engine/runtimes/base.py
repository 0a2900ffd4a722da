"""The small interface every runtime implements, and the model object users get back.

A runtime says which library versions change its output (they enter the cache key), turns a
validated recipe into the parameters that determine the artifact (nothing else enters the key, so
a description change never rebuilds), builds an artifact from a source folder, and loads one.
Runtime modules import their heavy libraries inside methods, never at module level.

A loaded model implements four primitives (encode, decode, stream token ids, generate a batch of
token ids); everything users call (generate, and later chat/stream/stop sequences) is written once
here on top of them, so every runtime behaves the same.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Sampling:
    """Decoding settings, the same names as transformers' GenerationConfig."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None


class Model(ABC):
    """What `engine.load()` returns, whatever the runtime."""

    #: token ids that end a generation (filled by the runtime from the artifact's config)
    eos_token_ids: frozenset[int] = frozenset()

    def __init__(self, info: dict, native: Any) -> None:
        self.info = info  # the registry record of the variant
        self.native = native  # the runtime's own object, for anything the engine does not wrap

    @property
    def name(self) -> str:
        return f"{self.info['name']}@{self.info['version']}"

    # -- primitives each runtime implements ------------------------------------------------------
    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids for `text`, with the special tokens the model expects at the start (BOS)."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text for token ids, special tokens dropped."""

    @abstractmethod
    def stream_ids(self, ids: list[int], sampling: Sampling) -> Iterator[int]:
        """Yield new token ids one by one as they are produced; stop at EOS or max_new_tokens."""

    def generate_ids(self, batch: list[list[int]], sampling: Sampling) -> list[list[int]]:
        """New token ids for each prompt. Runtimes that can batch override this."""
        return [list(self.stream_ids(ids, sampling)) for ids in batch]

    # -- what users call -------------------------------------------------------------------------
    def generate(self, prompt: str, max_new_tokens: int = 64, *, do_sample: bool = False,
                 temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, repetition_penalty: float | None = None,
                 seed: int | None = None) -> str:
        """Continue `prompt`; returns only the new text (greedy unless do_sample)."""
        sampling = Sampling(max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, seed)
        new = self.generate_ids([self.encode(prompt)], sampling)[0]
        return self.decode([t for t in new if t not in self.eos_token_ids])

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
        """The normalized parameters that determine the artifact (JSON-able).

        Keys starting with "_" reach `build` but not the cache key: use them for inputs whose
        content the key already holds (a calibration file's path beside its content hash).
        """

    def check_available(self, recipe: dict) -> None:
        """Raise RuntimeUnavailable when this machine cannot build/run the recipe's target."""

    @abstractmethod
    def build(self, source_dir: Path, out_dir: Path, params: dict, logs_dir: Path,
              progress: Progress) -> dict:
        """Write the artifact into `out_dir`; return facts worth recording (JSON-able)."""

    @abstractmethod
    def load(self, artifact_dir: Path, info: dict, **options: Any) -> Model:
        """Open a built artifact."""
