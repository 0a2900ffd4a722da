"""Every error a user can cause or meet, each with the exit code the CLI turns it into.

Errors also inherit the builtin they resemble (like huggingface_hub does), so library callers can
catch ``FileNotFoundError`` or ``ValueError`` without knowing our classes.
"""
from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_ERROR = 1  # a step failed, a runtime is missing, ...
EXIT_USAGE = 2  # click's own code for bad command-line usage
EXIT_INVALID_RECIPE = 3
EXIT_VERIFY_FAILED = 4
EXIT_NOT_FOUND = 5
EXIT_INTERNAL = 70  # a bug in the engine: the only case that may show a traceback (ENGINE_DEBUG=1)


class EngineError(Exception):
    """Base class: a message for a person, an optional hint, and an exit code."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


@dataclass(frozen=True)
class RecipeIssue:
    """One problem in a recipe, located in the file and in the document."""

    file: str  # path as given by the user, or "<string>"
    line: int  # 1-based; 0 when unknown
    col: int  # 1-based; 0 when unknown
    path: str  # dotted document path such as "quantization.group_size"; "" for the whole file
    message: str
    hint: str | None = None

    def render(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}" if self.line else self.file
        at = f" {self.path}:" if self.path else ""
        text = f"{where}:{at} {self.message}"
        return text + (f"\n    hint: {self.hint}" if self.hint else "")


class RecipeInvalid(EngineError, ValueError):
    """The recipe cannot be used; every issue found is listed at once."""

    exit_code = EXIT_INVALID_RECIPE

    def __init__(self, issues: list[RecipeIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(issue.render() for issue in issues))


class VariantNotFound(EngineError, LookupError):
    exit_code = EXIT_NOT_FOUND


class VerificationFailed(EngineError):
    """Artifact files on disk differ from what the registry recorded."""

    exit_code = EXIT_VERIFY_FAILED

    def __init__(self, message: str, problems: list[str], hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.problems = problems


class SourceUnavailable(EngineError, FileNotFoundError):
    """The source weights cannot be had: no network, missing folder, unknown revision."""


class RuntimeUnavailable(EngineError, ImportError):
    """The runtime (or its device support) is not installed."""


class BuildFailed(EngineError):
    """A runtime ran and failed; the message names the log that says why."""


class BackendFailed(EngineError, RuntimeError):
    """A runtime's library failed to load or run a registered artifact (its own words, once)."""
