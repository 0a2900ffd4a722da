"""Checks of a recipe against its source that the schema cannot make, run while planning (before
any work): eval lengths that exceed the model's context, and a source path the OS cannot even
look up. Each becomes a RecipeInvalid located at the recipe's line, like a schema error."""
from __future__ import annotations

import errno
from typing import Any

from .errors import EngineError, RecipeInvalid, RecipeIssue
from .recipe import Recipe
from .sources import Source

#: config.json keys that give a model's context length, in the order transformers models use them
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def issue(recipe: Recipe, path: tuple, message: str, hint: str | None = None) -> RecipeIssue:
    """A RecipeIssue at `path`, or at the nearest enclosing key the file wrote."""
    where = next((recipe.positions[path[:n]] for n in range(len(path), 0, -1) if path[:n] in recipe.positions),
                 (0, 0))
    return RecipeIssue(str(recipe.path) if recipe.path else "<string>", *where, ".".join(path), message, hint)


def context_length(config: dict | None) -> int | None:
    """The model's context in tokens, when its config says."""
    for key in CONTEXT_KEYS:
        value = (config or {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_eval_fits(recipe: Recipe, source: Source, spec: dict | None) -> None:
    """An eval window, or a speed prompt plus its new tokens, longer than the context would fail
    (or be silently wrong) only after the build: refuse it now."""
    context = context_length(source.config()) if spec else None
    if context is None:
        return
    issues = []
    ppl, speed = spec.get("perplexity"), spec.get("speed")
    if ppl and ppl["window"] > context:
        issues.append(issue(recipe, ("eval", "perplexity", "window"),
                            f"a window of {ppl['window']} tokens exceeds the model's context of {context} tokens",
                            f"use window: {context} or less"))
    if speed and speed["prompt_tokens"] + speed["new_tokens"] > context:
        total = speed["prompt_tokens"] + speed["new_tokens"]
        issues.append(issue(recipe, ("eval", "speed"),
                            f"prompt_tokens + new_tokens = {total} tokens exceed the model's context "
                            f"of {context} tokens",
                            f"keep prompt_tokens + new_tokens at {context} or less"))
    if issues:
        raise RecipeInvalid(issues)


def path_too_long(recipe: Recipe, error: OSError) -> RecipeInvalid | None:
    """The recipe error for a source path the OS refuses as too long (None for any other error)."""
    if isinstance(error, EngineError) or error.errno != errno.ENAMETOOLONG:
        return None
    given: Any = recipe.data["source"].get("path", "")
    short = given if len(str(given)) <= 80 else f"{str(given)[:60]}… ({len(str(given))} characters)"
    return RecipeInvalid([issue(recipe, ("source", "path"), f"the path is too long for this system: {short}",
                                "shorten it (a folder name has at most 255 bytes, a path about 4096)")])
