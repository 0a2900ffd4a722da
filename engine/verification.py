"""Re-hash a variant's files and compare them with what the registry recorded at apply time."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .hashing import sha256_file
from .paths import Locations
from .records import VariantRecord
from .registry import Registry
from .store import Store


@dataclass
class VerifyReport:
    variant: str  # name@version
    artifact_dir: Path
    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_variant(registry: Registry, store: Store, variant: VariantRecord) -> VerifyReport:
    """Every recorded file must exist as a regular file (not a link) with the recorded size and
    sha256 (full re-hash, no cache), and the folder must hold nothing else."""
    report = VerifyReport(variant.ref, store.entry_path(variant.artifact_key) / "files")
    recorded = registry.files(variant.artifact_key)
    if not recorded:
        report.problems.append("the registry lists no files for this variant")
    if report.artifact_dir.is_symlink() or not report.artifact_dir.is_dir():
        report.problems.append(f"artifact folder is missing: {report.artifact_dir}")
        return report
    for f in recorded:
        report.checked += 1
        problem = _check_file(report.artifact_dir / f["path"], f)
        if problem:
            report.problems.append(problem)
    known = {f["path"] for f in recorded}
    report.problems += _extra_entries(report.artifact_dir, known)
    return report


def _check_file(path: Path, recorded: dict) -> str | None:
    """What is wrong with one recorded file, or None. A link is wrong even to identical bytes:
    an artifact is regular files only (a runtime may refuse a link, and the store cannot vouch
    for what lies outside it)."""
    if path.is_symlink():
        return f"not a regular file (a link): {path}"
    if not path.is_file():
        return f"missing: {path}"
    size = path.stat().st_size
    if size != recorded["size"]:
        return f"changed (size {size} != {recorded['size']}): {path}"
    try:
        digest = sha256_file(path)
    except OSError as error:
        return f"unreadable ({error.strerror or error}): {path}"
    return None if digest == recorded["sha256"] else f"changed (sha256 differs): {path}"


def _extra_entries(folder: Path, known: set[str]) -> list[str]:
    """Files and links the registry does not list (links are not followed: a link to a folder is
    one unexpected entry, not a walk through whatever it points to)."""
    problems = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            if path.is_symlink():
                if path.relative_to(folder).as_posix() not in known:
                    problems.append(f"not a regular file (a link): {path}")
            elif path.is_file() and path.relative_to(folder).as_posix() not in known:
                problems.append(f"unexpected file: {path}")
    return problems


def verify(ref: str | None = None, locations: Locations | None = None, *, registry: str | Path | None = None,
           store: str | Path | None = None) -> list[VerifyReport]:
    """Verify one variant (NAME or NAME@V) or every version of every variant in the registry."""
    from .errors import RegistryNotFound
    from .paths import resolve

    locations = locations or resolve(registry, store)
    if not locations.registry.exists():
        raise RegistryNotFound(f"no registry at {locations.registry}",
                              hint="run `engine apply RECIPE.yaml` first, or pass --registry / set ENGINE_REGISTRY")
    opened = Registry(locations.registry, readonly=True)
    try:
        entries = Store(locations.store)
        variants = [opened.get(ref)] if ref else opened.variants(all_versions=True)
        return [verify_variant(opened, entries, v) for v in variants]
    finally:
        opened.close()
