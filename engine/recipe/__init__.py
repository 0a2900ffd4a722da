"""Recipes: a YAML file in, a validated document with defaults and source positions out.

Everything heavy (yaml, jsonschema) is imported on first parse so that ``import engine.recipe``
stays cheap for the CLI.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import RecipeInvalid, RecipeIssue

if TYPE_CHECKING:
    from engine.recipe.matrix import Skipped

__all__ = ["Recipe", "RecipeInvalid", "RecipeIssue", "defaulted_fields", "load_recipe", "load_recipes",
           "parse_recipe", "parse_recipes"]


@dataclass(frozen=True)
class Recipe:
    """A recipe that passed the common and runtime schemas. Treat ``data`` as read-only."""

    path: Path | None  # resolved absolute path of the file; None for text
    text: str  # the original text, byte for byte what was parsed
    data: dict[str, Any]  # validated, defaults filled
    positions: dict[tuple[Any, ...], tuple[int, int]]  # document path -> 1-based (line, col)
    matrix: dict[str, Any] | None = None  # for a sweep's variant: the swept keys and their values here
    filename: str = "<string>"  # the file as the user named it (how issues name it)

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def runtime(self) -> str:
        return self.data["target"]["runtime"]

    def issue(self, path: tuple[Any, ...], message: str, hint: str | None = None) -> RecipeIssue:
        """A RecipeIssue at `path` (a document path such as ("target", "options", "ftype")), located
        at the deepest part of it the file sets."""
        where = tuple(path)
        while where and where not in self.positions:
            where = where[:-1]
        line, col = self.positions.get(where, (0, 0))
        return RecipeIssue(self.filename, line, col, ".".join(str(p) for p in path), message, hint)

    def base_dir(self) -> Path:
        """Folder that relative paths in the recipe (source.path, calibration.dataset) resolve against."""
        return self.path.parent if self.path is not None else Path.cwd()


def defaulted_fields(data: dict[str, Any], text: str) -> dict[str, Any]:
    """The quantization and target fields of a validated recipe that its text did not write (so the
    schema or the runtime filled them): dotted key -> value. A sweep's `matrix:` keys count as written."""
    import yaml

    try:
        written = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        return {}
    swept = set((written.get("matrix") or {}) if isinstance(written, dict) else ())
    out = {}
    for section in ("quantization", "target"):
        given = written.get(section) if isinstance(written, dict) else None
        given = given if isinstance(given, dict) else {}
        for key, value in (data.get(section) or {}).items():
            if key not in given and f"{section}.{key}" not in swept:
                out[f"{section}.{key}"] = value
    return out


def parse_recipe(text: str, filename: str = "<string>", path: Path | None = None) -> Recipe:
    """Parse and validate recipe text; ``filename`` is how issues name the file. Raises RecipeInvalid."""
    recipes, skipped = parse_recipes(text, filename, path)
    if len(recipes) != 1 or skipped:
        raise RecipeInvalid([RecipeIssue(filename, 0, 0, "matrix", "this recipe is a sweep (it has a matrix)",
                                         "use load_recipes() / parse_recipes() for sweeps")])
    return recipes[0]


def parse_recipes(text: str, filename: str = "<string>", path: Path | None = None
                  ) -> tuple[list[Recipe], list["Skipped"]]:
    """Every variant a recipe defines (one, or one per matrix combination), and the combinations
    skipped because their runtime cannot do them. Raises RecipeInvalid for anything else."""
    from engine.recipe.matrix import Skipped, expand
    from engine.recipe.validate import validate, validate_stages
    from engine.recipe.yamlload import load_yaml

    data, positions = load_yaml(text, filename)
    resolved = Path(path).resolve() if path is not None else None
    if "matrix" not in data:
        return [Recipe(resolved, text, validate(data, positions, filename), positions, filename=filename)], []
    recipes, skipped, issues = [], [], []
    for doc, where, chosen in expand(data, positions, filename):
        common, runtime = validate_stages(doc, where, filename)
        if common:
            issues += [i for i in common if i not in issues]
        elif runtime:
            skipped.append(Skipped(doc["name"], "; ".join(f"{i.path}: {i.message}" for i in runtime)))
        else:
            recipes.append(Recipe(resolved, text, doc, where, chosen, filename=filename))
    if issues:
        raise RecipeInvalid(sorted(issues, key=lambda i: (i.line, i.col, i.path)))
    if not recipes:
        raise _all_skipped(skipped, positions, filename)
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise RecipeInvalid([RecipeIssue(filename, *positions.get(("name",), (0, 0)), "name",
                                         "the matrix gives two combinations the same name",
                                         "put a placeholder for every swept key in name")])
    return recipes, skipped


def _all_skipped(skipped: list["Skipped"], positions: dict, filename: str) -> RecipeInvalid:
    """A sweep that would do nothing is a mistake to say, not a success (exit 3)."""
    from engine.errors import SweepEmpty

    line, col = positions.get(("matrix",), (0, 0))
    reasons = "\n".join(f"skipped {s.name}: {s.reason}" for s in skipped)
    return SweepEmpty([RecipeIssue(filename, line, col, "matrix",
                                   "every combination of the sweep is skipped; nothing to apply\n" + reasons,
                                   "sweep values the runtime supports (`engine schema --runtime NAME` lists them)")])


def load_recipes(path: str | Path) -> tuple[list[Recipe], list["Skipped"]]:
    """Read a recipe file that may be a sweep; see parse_recipes."""
    from engine.recipe.yamlload import read_text

    filename = str(path)
    return parse_recipes(read_text(Path(path), filename), filename, Path(path))


def load_recipe(path: str | Path) -> Recipe:
    """Read, parse and validate a recipe file; issues name the file as the caller spelled it."""
    from engine.recipe.yamlload import read_text

    filename = str(path)
    return parse_recipe(read_text(Path(path), filename), filename, Path(path))
