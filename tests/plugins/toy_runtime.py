"""A minimal third-party runtime, as a pip package would ship it (tests/test_plugins.py registers it
through the `engine.runtimes` entry-point group from a dist-info folder the test writes).

`build` stores each float weight matrix as int8 codes with one absmax scale per row (numpy only);
the model "generates" by repeating the prompt's last token, which is enough to drive the engine's
generate/stream code written once in engine.runtime.Model.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.runtime import Model, Progress, Runtime, Sampling, Section


class ToyRuntime(Runtime):
    name = "toy"
    extra = "toy"
    distributions = ("numpy",)
    weight_dtypes = ("int8",)
    algorithms = ("rtn",)
    load_options = {"repeat": "the token id to repeat instead of the prompt's last one"}
    example_quantization = {"weight_dtype": "int8", "group_size": -1}

    def build_params(self, recipe: dict, base_dir: Path, source: Any) -> dict:
        config = source.config() or {}
        return {"precision": "int8", "per_row": True, "model_type": config.get("model_type"),
                "group_size": recipe["quantization"]["group_size"]}

    def build(self, source_dir: Path, out_dir: Path, params: dict, logs_dir: Path, progress: Progress) -> dict:
        import numpy as np
        from safetensors.numpy import load_file

        progress("toy: quantizing")
        tensors = load_file(str(source_dir / "model.safetensors"))
        _pause_here()
        packed, rows = {}, 0
        for name, weight in sorted(tensors.items()):
            scale = np.abs(weight).max(axis=-1, keepdims=True) / 127
            packed[name] = np.round(weight / np.where(scale == 0, 1, scale)).astype(np.int8)
            packed[name + ".scale"] = scale.astype(np.float32)
            rows += weight.shape[0]
        np.savez(out_dir / "weights.npz", **packed)
        shutil.copy2(source_dir / "config.json", out_dir / "config.json")
        (logs_dir / "build.log").write_text(f"quantized {len(tensors)} tensors\n")
        return {"tensors": len(tensors), "rows": rows, "table": [["weights", "int8 per row"]]}

    def show_sections(self, meta: dict) -> list[Section]:
        return [Section("toy storage", ("what", "as"), meta.get("table", []))]

    def open(self, artifact_dir: Path, info: Any, **options: Any) -> Model:
        config = json.loads((artifact_dir / "config.json").read_text())
        return ToyModel(info, config, options.get("repeat"))


class ToyModel(Model):
    def __init__(self, info: Any, config: dict, repeat: int | None) -> None:
        super().__init__(info, config)
        self.repeat = repeat

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", "replace")

    def stream_ids(self, ids: list[int], sampling: Sampling) -> Iterator[int]:
        token = self.repeat if self.repeat is not None else ids[-1]
        for _ in range(sampling.max_new_tokens):
            yield token


def _pause_here() -> None:
    """Tests stop a build midway: with TOY_PAUSE=<file>, write <file>.started, then wait (60 s at
    most) until <file> exists, so a test can act while the build runs (after the source was read)."""
    gate = os.environ.get("TOY_PAUSE")
    if not gate:
        return
    open(gate + ".started", "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)
