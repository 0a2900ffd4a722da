"""Sweeps: one recipe with a `matrix:` expands to one variant per combination of values.

    name: wt2-{target.runtime}-{quantization.weight_dtype}
    matrix:
      quantization.weight_dtype: [int8, int4]
      target.runtime: [openvino, onnxruntime-genai]

Placeholders in `name` are matrix keys, written in full or by their last part ({weight_dtype}).
Each combination is validated like a recipe of its own; one that only its runtime cannot do is
skipped with a line saying why, anything else wrong fails the whole sweep.

The combinations are counted before any is made and refused above MAX_COMBINATIONS (the
ENGINE_MAX_COMBINATIONS variable raises it): two keys of 700 values would otherwise be 490,000
documents in memory. They are then made one at a time (`expand` is a generator).
"""
from __future__ import annotations

import copy
import itertools
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from engine.errors import RecipeInvalid, RecipeIssue

MAX_COMBINATIONS = 256  # a sweep is a few dozen variants; each one is a build
_ALLOWED_ROOTS = ("quantization", "target", "source", "eval", "description")
_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_.]+)\}")


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


def max_combinations() -> int:
    """The documented limit, or ENGINE_MAX_COMBINATIONS when it is a positive whole number."""
    value = os.environ.get("ENGINE_MAX_COMBINATIONS", "")
    return int(value) if value.isdigit() and int(value) > 0 else MAX_COMBINATIONS


def expand(data: dict[str, Any], positions: dict, filename: str) -> Iterator[tuple[dict, dict, dict]]:
    """(concrete data, positions, {matrix key: value}) for every combination, in order, one at a
    time; the matrix is checked (and its size bounded) before the first is made."""
    matrix = data["matrix"]
    _check_matrix(matrix, data.get("name"), positions, filename)
    _check_size(matrix, positions, filename)
    return _combinations(data, matrix, positions, filename)


def _check_size(matrix: dict, positions: dict, filename: str) -> None:
    count, limit = math.prod(len(v) for v in matrix.values()), max_combinations()
    if count > limit:
        raise _issue(positions, ("matrix",), filename,
                     f"the matrix makes {count:,} combinations, more than {limit:,}",
                     "sweep fewer values or split the recipe; to allow more, set ENGINE_MAX_COMBINATIONS=N")


def _combinations(data: dict, matrix: dict, positions: dict, filename: str) -> Iterator[tuple[dict, dict, dict]]:
    keys = list(matrix)
    for values in itertools.product(*(matrix[k] for k in keys)):
        chosen = dict(zip(keys, values))
        doc = copy.deepcopy({k: v for k, v in data.items() if k != "matrix"})
        where = dict(positions)
        for key, value in chosen.items():
            parts = tuple(key.split("."))
            node = doc
            for part in parts[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise _issue(positions, ("matrix", key), filename, f"'{key}' does not lead to a mapping")
            node[parts[-1]] = value
            where[parts] = positions.get(("matrix", key), (0, 0))
        doc["name"] = _fill_name(data["name"], chosen)
        yield doc, where, chosen


def _fill_name(template: str, chosen: dict[str, Any]) -> str:
    def value(match: re.Match) -> str:
        wanted = match.group(1)
        for key, val in chosen.items():
            if wanted in (key, key.rsplit(".", 1)[-1]):
                return re.sub(r"[^a-z0-9._-]+", "-", str(val).lower())
        return match.group(0)

    return _PLACEHOLDER.sub(value, template)


def _check_matrix(matrix: Any, name: Any, positions: dict, filename: str) -> None:
    if not isinstance(matrix, dict) or not matrix:
        raise _issue(positions, ("matrix",), filename, "matrix must map dotted keys to lists of values",
                     "e.g. matrix: {quantization.weight_dtype: [int8, int4]}")
    issues = []
    for key, values in matrix.items():
        if key.split(".")[0] not in _ALLOWED_ROOTS:
            issues.append(_make(positions, ("matrix", key), filename, f"matrix key '{key}' cannot be swept",
                                "sweep fields under " + ", ".join(_ALLOWED_ROOTS)))
        elif not isinstance(values, list) or not values:
            issues.append(_make(positions, ("matrix", key), filename, f"matrix.{key} must be a non-empty list"))
    if issues:
        raise RecipeInvalid(issues)
    if not isinstance(name, str):
        raise _issue(positions, ("name",) if ("name",) in positions else ("matrix",), filename,
                     "a sweep needs a name with a placeholder for every swept key",
                     "e.g. name: wt2-{" + next(iter(matrix)).rsplit(".", 1)[-1] + "}")
    used = set(_PLACEHOLDER.findall(name))
    missing = [k for k in matrix if len(matrix[k]) > 1 and not used & {k, k.rsplit(".", 1)[-1]}]
    if missing:
        raise _issue(positions, ("name",), filename,
                     "name must tell the combinations apart: no placeholder for " + ", ".join(missing),
                     "e.g. name: wt2-{" + missing[0] + "}")


def _make(positions: dict, path: tuple, filename: str, message: str, hint: str | None = None) -> RecipeIssue:
    line, col = positions.get(path, positions.get(path[:1], (0, 0)))
    return RecipeIssue(filename, line, col, ".".join(path), message, hint)


def _issue(positions: dict, path: tuple, filename: str, message: str, hint: str | None = None) -> RecipeInvalid:
    return RecipeInvalid([_make(positions, path, filename, message, hint)])
