"""The recipe `task`: what kind of model a variant is, and which runtimes can build it.

A recipe that leaves `task` out is a causal LM (`text-generation`): nothing is filled in, so its
recorded recipe, its cache keys and its registry versions stay what they were before tasks existed.
Each runtime declares `tasks`; asking one for a task it lacks is refused at validation, naming the
installed runtimes that have it.
"""
from __future__ import annotations

from typing import Any

from .errors import EngineError, RecipeIssue

DEFAULT_TASK = "text-generation"
TASKS = ("text-generation", "text2text-generation", "feature-extraction")
#: what a variant of each task is for (errors and `engine ls` use it)
TASK_WORDS = {"text-generation": "generates text (generate, chat, stream)",
              "text2text-generation": "generates an output text from an input (generate, stream)",
              "feature-extraction": "embeds texts (embed)"}


class WrongTask(EngineError, TypeError):
    """A call the variant's task does not offer (embed on a generator, generate on an embedder)."""


def task_of(recipe: dict[str, Any] | None) -> str:
    """The task of a recipe's data (or a recorded recipe): text-generation when it says none."""
    return (recipe or {}).get("task") or DEFAULT_TASK


def key_part(recipe: dict[str, Any]) -> dict[str, str]:
    """What the task adds to a build key: nothing for the default (keys made before tasks stay)."""
    task = task_of(recipe)
    return {} if task == DEFAULT_TASK else {"task": task}


def runtimes_with(task: str) -> list[str]:
    from .discovery import get_runtime, runtime_names

    return [name for name in runtime_names() if task in get_runtime(name).tasks]


#: eval sections -> the one task they score
EVAL_TASK = {"perplexity": "text-generation", "embeddings": "feature-extraction", "text2text": "text2text-generation"}
EVAL_FOR = {task: section for section, task in EVAL_TASK.items()}


def eval_issues(data: dict[str, Any], positions: dict, filename: str) -> list[RecipeIssue]:
    """Eval sections that score another task than the recipe's (perplexity of an embedder, ...)."""
    task, issues = task_of(data), []
    for section, scores in EVAL_TASK.items():
        if section in (data.get("eval") or {}) and scores != task:
            line, col = positions.get(("eval", section)) or (0, 0)
            issues.append(RecipeIssue(filename, line, col, f"eval.{section}",
                                      f"eval.{section} scores {scores} variants; this recipe's task is {task}",
                                      f"use eval.{EVAL_FOR[task]} for a {task} variant"))
    if task == "feature-extraction" and ("eval", "speed") in positions:  # written, not a filled default
        line, col = positions.get(("eval", "speed")) or (0, 0)
        issues.append(RecipeIssue(filename, line, col, "eval.speed", "an embedding model generates no tokens: "
                                  "eval.speed measures decoding", "eval.embeddings measures sentences/s; remove eval.speed"))
    return issues


def task_issues(data: dict[str, Any], positions: dict, filename: str) -> list[RecipeIssue]:
    """The recipe's task against its runtime's declaration and its eval sections (after the common
    schema passed)."""
    from .discovery import get_runtime, runtime_names

    runtime, task = data["target"]["runtime"], task_of(data)
    if runtime not in runtime_names() or task in get_runtime(runtime).tasks:
        return eval_issues(data, positions, filename)
    having = [n for n in runtimes_with(task) if n != runtime]
    path = ("task",) if "task" in data else ("target", "runtime")
    line, col = positions.get(path) or positions.get(("target", "runtime")) or (0, 0)
    hint = (f"use target.runtime: {' or '.join(having)}" if having else f"no installed runtime builds {task}")
    return [RecipeIssue(filename, line, col, "task",
                        f"runtime '{runtime}' does not build task '{task}' (it builds: "
                        f"{', '.join(get_runtime(runtime).tasks)})", hint)]


def wrong_task(model: Any, wanted: str, call: str) -> WrongTask:
    task = task_of(getattr(model.info, "recipe", None))
    tasks = " or ".join(f"`task: {t}`" for t in wanted.split(" or "))
    return WrongTask(f"{model.name} is a {task} variant: it {TASK_WORDS[task]}, so it cannot {call}",
                     hint=f"{call} needs a {wanted} variant (a recipe with {tasks})")
