"""Check recipe data against the common schema, fill defaults, then check the runtime's own schema.

jsonschema's messages are written for programmers and point nowhere; every error here is rewritten
for the person editing the YAML, located at a line, and given a hint when we can guess the fix.
"""
from __future__ import annotations

import copy
import difflib
from functools import lru_cache
from typing import Any

from engine.errors import RecipeInvalid, RecipeIssue
from engine.recipe.schemas import load_schema, recipe_schema, runtime_schema
from engine.recipe.yamlload import DocPath, Pos, dotted

Found = tuple[DocPath, str, "str | None"]  # (document path, message, hint)

_TYPE_WORDS = {"object": "a mapping", "array": "a list", "null": "null"}


@lru_cache(maxsize=None)
def _validator(runtime: str | None) -> Any:
    """The common schema's validator (None) or a runtime's."""
    from jsonschema import (
        Draft202012Validator,  # ~0.1 s to import: only when a recipe is checked
    )

    return Draft202012Validator(recipe_schema() if runtime is None else runtime_schema(runtime))


def validate(data: dict[str, Any], positions: dict[DocPath, Pos], filename: str) -> dict[str, Any]:
    """Validate ``data`` in place, fill schema defaults, and return it; raise RecipeInvalid listing every issue."""
    issues = _check(data, positions, filename, None)
    if issues:
        raise RecipeInvalid(issues)
    fill_defaults(load_schema("recipe"), data)
    runtime = data["target"]["runtime"]
    fill_runtime_defaults(runtime, data)
    if runtime_schema(runtime) is not None:
        issues = _runtime_issues(data, positions, filename, runtime)
        if issues:
            raise RecipeInvalid(issues)
    return data


def _runtime_issues(data: dict[str, Any], positions: dict[DocPath, Pos], filename: str,
                    runtime: str) -> list[RecipeIssue]:
    """The recipe's task against the runtime's declaration first: if the runtime lacks the task,
    its schema's complaints would only be noise."""
    from engine.tasks import task_issues

    return task_issues(data, positions, filename) or _check(data, positions, filename, runtime)


def validate_stages(data: dict[str, Any], positions: dict[DocPath, Pos], filename: str
                    ) -> tuple[list[RecipeIssue], list[RecipeIssue]]:
    """(common-schema issues, runtime-schema issues); a sweep skips combinations failing only the latter."""
    common = _check(data, positions, filename, None)
    if common:
        return common, []
    fill_defaults(load_schema("recipe"), data)
    runtime = data["target"]["runtime"]
    fill_runtime_defaults(runtime, data)
    if runtime_schema(runtime) is None:
        return [], []
    return [], _runtime_issues(data, positions, filename, runtime)


def fill_defaults(schema: dict[str, Any], instance: dict[str, Any]) -> None:
    """Add each missing ``default``, descending only into objects that exist (or just got a default)."""
    for key, sub in schema.get("properties", {}).items():
        if not isinstance(sub, dict):
            continue
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if isinstance(instance.get(key), dict) and "properties" in sub:
            fill_defaults(sub, instance[key])


def fill_runtime_defaults(runtime: str, data: dict[str, Any]) -> None:
    """Fill what the recipe leaves out with the runtime's recommended values (Runtime.defaults)."""
    if runtime_schema(runtime) is None:  # unknown runtime: the common schema already said so
        return
    from engine.discovery import get_runtime

    for dotted_key, value in get_runtime(runtime).defaults(data).items():
        *parents, last = dotted_key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node.setdefault(last, copy.deepcopy(value))


def _check(data: Any, positions: dict[DocPath, Pos], filename: str, runtime: str | None) -> list[RecipeIssue]:
    """Issues against the common schema (runtime None) or the runtime's."""
    errors = list(_validator(runtime).iter_errors(data))
    # A wrong type makes the enum/pattern/... errors at the same place noise.
    typed = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
    issues: dict[tuple[str, str], RecipeIssue] = {}
    for error in errors:
        if error.validator != "type" and tuple(error.absolute_path) in typed:
            continue
        for path, message, hint in _describe(error, runtime):
            if runtime and path not in positions and error.validator != "additionalProperties":
                hint = hint or f"{dotted(path)} is a default here; set it to a supported value"
            line, col = _locate(path, positions)
            issues.setdefault((dotted(path), message), RecipeIssue(filename, line, col, dotted(path), message, hint))
    return sorted(issues.values(), key=lambda i: (i.line, i.col, i.path, i.message))


def _locate(path: DocPath, positions: dict[DocPath, Pos]) -> Pos:
    """Position of the deepest part of ``path`` that is in the file."""
    while path and path not in positions:
        path = path[:-1]
    return positions.get(path, (0, 0))


def _describe(error: Any, runtime: str | None) -> list[Found]:
    """One error as (path, message, hint) tuples: several for several unknown keys."""
    schema = error.schema if isinstance(error.schema, dict) else {}
    path, kind, value, instance = tuple(error.absolute_path), error.validator, error.validator_value, error.instance
    x_hint = schema.get("x-hint")
    if kind == "additionalProperties":
        allowed = list(schema.get("properties", {}))
        return [(path + (key,), _unknown_message(key, path, runtime), _unknown_hint(key, allowed, path, runtime))
                for key in instance if key not in allowed]
    parent = error.parent.schema if error.parent is not None and isinstance(error.parent.schema, dict) else {}
    x_error = schema.get("x-error") or parent.get("x-error")
    if x_error:
        return [(path, x_error, x_hint or parent.get("x-hint"))]
    if kind == "required":
        return [(path, f"missing required key '{key}'", None) for key in value if key not in instance]
    if kind == "enum":
        where = f"is not supported by runtime '{runtime}' (supported:" if runtime else "is not one of"
        options = ", ".join(_plain(v) for v in value)
        message = f"{_quote(instance)} {where} {options}" + (")" if runtime else "")
        return [(path, message, _join(_closest(instance, value), x_hint))]
    if kind == "type":
        hint = _join(_type_hint(value, instance), x_hint)
        return [(path, f"expected {_expected(value)}, got {_what(instance)}", hint)]
    if kind in ("anyOf", "oneOf") and error.context:
        types = [e.validator_value for e in error.context if e.validator == "type" and not e.relative_path]
        if len(types) == len(error.context):
            return [(path, f"expected {_expected(types)}, got {_what(instance)}", x_hint)]
        from jsonschema.exceptions import best_match

        # Prefer errors from the branch whose type matched: `[]` is "empty list", not "not a string".
        typed_ok = [e for e in error.context if e.validator != "type" or e.relative_path]
        return _describe(best_match(typed_ok or error.context), runtime)
    if kind == "uniqueItems":
        return [(path, "has duplicate items", _duplicate_hint(instance))]
    message = _message(kind, value, instance, error.message)
    if runtime:
        message += f" (runtime '{runtime}')"
    return [(path, message, x_hint)]


def _message(kind: str, value: Any, instance: Any, fallback: str) -> str:
    if kind == "pattern":
        return f"{_quote(instance)} does not match the pattern {value}"
    if kind == "minimum":
        return f"{_quote(instance)} is less than the minimum {value}"
    if kind == "maximum":
        return f"{_quote(instance)} is more than the maximum {value}"
    if kind == "minLength":
        return "must not be empty" if value == 1 else f"must be at least {value} characters long"
    if kind == "maxLength":
        return f"must be at most {value} characters long"
    if kind == "minItems":
        return "must not be an empty list" if value == 1 else f"needs at least {value} items"
    if kind == "not":
        return "is not allowed here"
    return fallback


def _unknown_message(key: str, path: DocPath, runtime: str | None) -> str:
    if runtime and path == ("target", "options"):
        return f"unknown option '{key}' for runtime '{runtime}'"
    if runtime:
        return f"'{key}' is not supported by runtime '{runtime}'"
    return f"unknown key '{key}'"


def _unknown_hint(key: str, allowed: list[str], path: DocPath, runtime: str | None) -> str:
    guess = _closest(key, allowed)
    if guess:
        return guess
    if not allowed:
        return f"runtime '{runtime}' takes no options" if runtime else "this mapping takes no keys"
    return "allowed: " + ", ".join(allowed)


def _closest(instance: Any, options: list[Any]) -> str | None:
    """'did you mean ...?' for a near-miss string, or the nearest allowed numbers."""
    if isinstance(instance, str):
        by_lower = {str(o).lower(): o for o in options if isinstance(o, str)}
        close = difflib.get_close_matches(instance.lower(), list(by_lower), n=2, cutoff=0.75)
        return "did you mean " + " or ".join(f"'{by_lower[c]}'" for c in close) + "?" if close else None
    numbers = [o for o in options if isinstance(o, (int, float)) and not isinstance(o, bool)]
    if isinstance(instance, (int, float)) and not isinstance(instance, bool) and numbers:
        near = sorted(numbers, key=lambda o: (abs(o - instance), o))[:2]
        return "nearest allowed: " + " or ".join(_plain(n) for n in sorted(near))
    return None


def _type_hint(expected: Any, instance: Any) -> str | None:
    names = expected if isinstance(expected, list) else [expected]
    if isinstance(instance, str) and {"integer", "number"} & set(names):
        try:
            float(instance)
        except ValueError:
            return None
        if "e" in instance.lower() and "." not in instance:  # YAML 1.1 reads 1e3 as text, quoted or not
            return f"YAML reads {instance} as text: write the number in digits (or as 1.0e+3 style)"
        return f"remove the quotes: write {instance}, not \"{instance}\""
    if "string" in names and isinstance(instance, (int, float, bool)):
        return "put the value in quotes to make it a string"
    return None


def _expected(types: Any) -> str:
    names: list[str] = []
    for t in types if isinstance(types, list) else [types]:
        names += t if isinstance(t, list) else [t]
    return " or ".join(_TYPE_WORDS.get(n, n) for n in names)


def _what(instance: Any) -> str:
    if isinstance(instance, dict):
        return "a mapping"
    if isinstance(instance, list):
        return "a list"
    if instance is None:
        return "null (no value)"
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string"}
    return f"{kinds.get(type(instance), type(instance).__name__)} {_quote(instance)}"


def _duplicate_hint(items: list[Any]) -> str | None:
    seen: set[str] = set()
    for item in items:
        key = repr(item)
        if key in seen:
            return f"{_quote(item)} is listed more than once"
        seen.add(key)
    return None


def _plain(value: Any) -> str:
    """A value as YAML would spell it: true, null, 32, int4."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def _quote(value: Any) -> str:
    return f"'{value}'" if isinstance(value, str) else _plain(value)


def _join(*parts: str | None) -> str | None:
    kept = [p for p in parts if p]
    return "; ".join(kept) if kept else None
