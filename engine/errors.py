"""Every error a user can cause or meet, each with the exit code the CLI turns it into.

Errors also inherit the builtin they resemble (like huggingface_hub does), so library callers can
catch ``FileNotFoundError`` or ``ValueError`` without knowing our classes.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass

EXIT_OK = 0
EXIT_ERROR = 1  # a step failed, a runtime is missing, ...
EXIT_USAGE = 2  # click's own code for bad command-line usage
EXIT_INVALID_RECIPE = 3
EXIT_VERIFY_FAILED = 4
EXIT_NOT_FOUND = 5
EXIT_INTERNAL = 70  # a bug in the engine: the only case that may show a traceback (ENGINE_DEBUG=1)

#: OS errors that say a disk or permissions are at fault, not the engine (never exit 70)
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


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


class RegistryNotFound(VariantNotFound):
    """No registry file where one was named (a typo in --registry, or nothing applied yet)."""


class StoreBusy(EngineError):
    """Another process holds the store in a way that forbids this command now (gc during an apply)."""


class GcRefused(EngineError):
    """gc cannot prove an entry unused (a registry sharing the store is missing or unreadable)."""


class ArtifactVanished(EngineError, FileNotFoundError):
    """A store entry an apply was about to register is gone (deleted by hand meanwhile)."""


class RegistryDamaged(EngineError):
    """The registry file is not a readable SQLite database (garbage, truncated, malformed)."""


class RegistryUnavailable(EngineError, OSError):
    """The registry cannot be opened or written: permissions, a read-only or full disk."""


class StoreUnavailable(EngineError, OSError):
    """The store cannot be written: permissions, a read-only or full disk."""


class SourceChanged(EngineError):
    """The source folder changed while a step read it; committing would key new bytes by the old digest."""


class SourceRefused(SourceUnavailable):
    """A source folder holds something a source may not (a link leading outside it, a device, ...)."""


class SweepEmpty(RecipeInvalid):
    """Every combination of a sweep was skipped: there is nothing to apply."""


def os_error_text(error: OSError) -> str:
    """'No space left on device' and the like, without the errno noise."""
    return error.strerror or str(error)


def registry_error(path, error: Exception) -> EngineError:
    """One clear EngineError for a sqlite3/OS failure on the registry at `path`."""
    text = str(error)
    if isinstance(error, OSError):
        text = os_error_text(error)
    lowered = text.lower()
    if "not a database" in lowered or "malformed" in lowered or "no such table" in lowered:
        return RegistryDamaged(
            f"the registry {path} is not a readable engine registry ({text})",
            hint="move the file aside and restore a backup; the store keeps the artifacts, so re-applying "
                 "the recipes registers them again without rebuilding")
    if "full" in lowered:
        return RegistryUnavailable(f"cannot write the registry {path}: the disk is full ({text})",
                                   hint="free space on that disk, or pass --registry on another disk")
    return RegistryUnavailable(
        f"cannot open or write the registry {path} ({text})",
        hint="make the file and its folder writable (SQLite also writes -wal and -shm files beside it), "
             "or pass --registry / set ENGINE_REGISTRY to a writable place")


def store_error(path, error: OSError) -> StoreUnavailable:
    """One clear EngineError for an OS failure while writing the store at `path`."""
    text = os_error_text(error)
    where = getattr(error, "filename", None) or path
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreUnavailable(f"the disk is full writing the store: {where} ({text}); nothing was registered",
                                hint=f"free space, or point ENGINE_STORE / --store at another disk (store: {path})")
    return StoreUnavailable(f"cannot write the store: {where} ({text}); nothing was registered",
                            hint=f"make {path} writable, or point ENGINE_STORE / --store at a writable folder")
class BackendFailed(EngineError, RuntimeError):
    """A runtime's library failed to load or run a registered artifact (its own words, once)."""
