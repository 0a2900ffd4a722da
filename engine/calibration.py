"""Calibration data for data-aware algorithms (AWQ, GPTQ, TEQ, ...), offline first.

`quantization.calibration.dataset` is a local text file (relative to the recipe) or a list of
strings. What enters a step key is the content hash plus samples/seq_len, never the path: moving
the file rebuilds nothing, changing one byte of it rebuilds.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import SourceUnavailable


def _resolve(dataset: str, base_dir: Path) -> Path:
    path = (base_dir / dataset).expanduser()
    if not path.is_file():
        raise SourceUnavailable(
            f"calibration file not found: {path} (quantization.calibration.dataset)",
            hint="give a local text file (relative to the recipe) or a list of strings",
        )
    return path


def calibration_key(calibration: dict | None, base_dir: Path) -> dict | None:
    """The part of a step key that stands for the calibration data (content hash, not path)."""
    if not calibration:
        return None
    dataset = calibration["dataset"]
    if isinstance(dataset, str):
        digest = hashlib.sha256(_resolve(dataset, base_dir).read_bytes()).hexdigest()
    else:
        digest = hashlib.sha256("\n\x00".join(dataset).encode("utf-8")).hexdigest()
    return {"sha256": digest, "samples": calibration.get("samples", 128), "seq_len": calibration.get("seq_len", 512)}


def load_texts(calibration: dict, base_dir: Path) -> list[str]:
    """Up to `samples` texts: the list as given, or the file's non-empty paragraphs (lines)."""
    dataset = calibration["dataset"]
    if isinstance(dataset, str):
        text = _resolve(dataset, base_dir).read_text(encoding="utf-8", errors="replace")
        items = [line.strip() for line in text.splitlines() if len(line.strip()) >= 16]
    else:
        items = [t for t in dataset if t.strip()]
    if not items:
        raise SourceUnavailable("calibration data is empty (quantization.calibration.dataset)",
                                hint="give at least one non-empty line or string")
    return items[: calibration.get("samples", 128)]
