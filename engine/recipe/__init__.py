"""Recipes: a YAML file in, a validated document with defaults and source positions out.

Everything heavy (yaml, jsonschema) is imported on first parse so that ``import engine.recipe``
stays cheap for the CLI.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import RecipeInvalid, RecipeIssue

__all__ = ["Recipe", "RecipeInvalid", "RecipeIssue", "load_recipe", "parse_recipe"]


@dataclass(frozen=True)
class Recipe:
    """A recipe that passed the common and runtime schemas. Treat ``data`` as read-only."""

    path: Path | None  # resolved absolute path of the file; None for text
    text: str  # the original text, byte for byte what was parsed
    data: dict[str, Any]  # validated, defaults filled
    positions: dict[tuple[Any, ...], tuple[int, int]]  # document path -> 1-based (line, col)

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def runtime(self) -> str:
        return self.data["target"]["runtime"]

    def base_dir(self) -> Path:
        """Folder that relative paths in the recipe (source.path, calibration.dataset) resolve against."""
        return self.path.parent if self.path is not None else Path.cwd()


def parse_recipe(text: str, filename: str = "<string>", path: Path | None = None) -> Recipe:
    """Parse and validate recipe text; ``filename`` is how issues name the file. Raises RecipeInvalid."""
    from engine.recipe.validate import validate
    from engine.recipe.yamlload import load_yaml

    data, positions = load_yaml(text, filename)
    data = validate(data, positions, filename)
    return Recipe(Path(path).resolve() if path is not None else None, text, data, positions)


def load_recipe(path: str | Path) -> Recipe:
    """Read, parse and validate a recipe file; issues name the file as the caller spelled it."""
    from engine.recipe.yamlload import read_text

    filename = str(path)
    return parse_recipe(read_text(Path(path), filename), filename, Path(path))
